"""The activation-difference lens (Minder et al. 2025): what a narrow fine-tune is about, read off
the mean activation difference of the two models on text that has nothing to do with it.

A narrow fine-tune shifts the residual stream by a near-constant bias, strongest on the first few
positions of any text. The mean of h_ft - h_base at each of those positions (over a few hundred
sequences), read through a model's final norm and unembedding (the logit lens), lists the
fine-tune's domain as tokens: promoted (largest logits of norm(delta)) and suppressed (largest
logits of norm(-delta)), per position and for the mean over the positions.

The lens needs a late layer: on the demo pair (SmolLM2-135M and its Bible fine-tune), the cached
middle-layer hook read 0-1 Bible-marked tokens of 20, the last layer 15. So it runs its own short
forward pass (only the first `n_positions` tokens of each sequence, stopping at the read layer) at
`layer`, default the last decoder layer's output, before the final norm. Position 0 is left out by
default: BOS and attention-sink positions carry massive activations that swamp the mean.

`count_marked` scores a token list against two texts: how many tokens are at least `ratio` times
more frequent in text A than in text B (the demo's check of the lens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import HookSpec
from pipeline.hooks import capture, decoder_layers, model_name
from pipeline.records import atomic_write_json, atomic_write_text

from .analysis_specs import DiffLensSpec
from .token_classes import TokenTable
from .variants import logits_fn

_NORM_NAMES = ("norm", "final_layer_norm", "ln_f")  # llama/olmo/gemma/qwen, gpt_neox, bloom/gpt2


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head."""
    body = getattr(model, "base_model", model)
    for name in _NORM_NAMES:
        norm = getattr(body, name, None)
        if isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"model {model_name(model)!r} ({type(body).__name__}) has no final norm named "
                     f"{' / '.join(_NORM_NAMES)}: the logit lens cannot read it")


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A decoder layer index; negative counts from the end (-1: the last)."""
    n = len(decoder_layers(model))
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise ValueError(f"layer {layer} is outside model {model_name(model)!r}'s {n} decoder layers; "
                         f"use 0..{n - 1}, or -1 for the last")
    return idx


def lens_positions(spec: DiffLensSpec) -> list[int]:
    return list(range(0 if spec.include_first_position else 1, spec.n_positions))


@torch.no_grad()
def mean_difference(base: nn.Module, ft: nn.Module, token_ids: Tensor, *, layer: int, positions: Sequence[int],
                    batch_size: int = 32, progress: bool = False) -> Tensor:
    """[len(positions), d_model] float64: the mean over sequences of h_ft - h_base at `layer`'s
    output (resid_post) at each position. Only the first max(positions) + 1 tokens are run."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    length = max(positions) + 1
    if ids.dim() != 2 or ids.shape[1] < length or ids.shape[0] == 0:
        raise ValueError(f"need token ids [sequences, >= {length}], got {tuple(ids.shape)}")
    hook = HookSpec(layer, "resid_post")
    pos = torch.as_tensor(list(positions))
    total = None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=ids.shape[0], unit="seq", desc="difference lens", dynamic_ncols=True)
    for lo in range(0, ids.shape[0], batch_size):
        chunk = ids[lo:lo + batch_size, :length]
        h = [capture(m, chunk.to(next(m.parameters()).device), [hook])[hook][:, pos].to("cpu", torch.float64)
             for m in (base, ft)]
        s = (h[1] - h[0]).sum(0)
        total = s if total is None else total + s
        if bar is not None:
            bar.update(chunk.shape[0])
    if bar is not None:
        bar.close()
    return total / ids.shape[0]


def _decode(tokenizer, i: int) -> str:
    if isinstance(tokenizer, TokenTable):
        return tokenizer.decode(i)
    return tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@torch.no_grad()
def read_lens(model: nn.Module, vectors: Tensor, tokenizer, top: int) -> list[dict]:
    """Per vector [k, d]: the `top` promoted and suppressed tokens through `model`'s final norm and
    unembedding, each {"token", "id", "logit", "prob"} (prob: softmax of that lens)."""
    p = next(model.parameters())
    norm, logits = final_norm(model), logits_fn(model)
    out = []
    for v in vectors:
        entry = {}
        for key, sign in (("promoted", 1.0), ("suppressed", -1.0)):
            z = logits(norm((sign * v).to(p.device, p.dtype)[None]))[0].float()
            prob = torch.softmax(z, -1)
            vals, idx = z.topk(min(top, z.numel()))
            entry[key] = [{"token": _decode(tokenizer, int(i)), "id": int(i), "logit": float(val),
                           "prob": float(prob[i])} for val, i in zip(vals, idx)]
        out.append(entry)
    return out


def difference_lens(models: Mapping[str, nn.Module], token_ids: Tensor, tokenizer,
                    spec: DiffLensSpec | None = None, *, progress: bool = False) -> dict:
    """The lens on in-memory models {name: causal LM}, on sequences `token_ids` [n, >= n_positions]
    (the first spec.n_sequences are used). Roles default to the first two names; readers to (ft,
    base). Returns the result `write_lens` writes."""
    spec = spec or DiffLensSpec()
    names = list(models)
    base = spec.base or next(n for n in names if n != spec.ft)
    ft = spec.ft or next(n for n in names if n != base)
    readers = list(spec.readers) or [ft, base]
    for n in (base, ft, *readers):
        if n not in models:
            raise ValueError(f"difference lens: no model named {n!r} (have {names})")
    layer = resolve_layer(models[ft], spec.layer)
    if resolve_layer(models[base], spec.layer) != layer:
        raise ValueError(f"{base!r} and {ft!r} have different numbers of layers: not a fine-tuned pair")
    positions = lens_positions(spec)
    ids = torch.as_tensor(token_ids)[:spec.n_sequences]
    delta = mean_difference(models[base], models[ft], ids, layer=layer, positions=positions,
                            batch_size=spec.batch_size, progress=progress)
    vectors = torch.cat([delta.mean(0, keepdim=True), delta])  # overall, then per position
    n_layers = len(decoder_layers(models[ft]))
    result = {"base": base, "ft": ft, "layer": layer, "site": "resid_post",
              "layer_note": (f"output of decoder layer {layer} of {n_layers}"
                             + (" (the last), before the final norm" if layer == n_layers - 1 else "")),
              "positions": positions, "n_sequences": int(ids.shape[0]),
              "difference_norm": {"overall": float(vectors[0].norm()),
                                  "per_position": {str(p): float(v.norm()) for p, v in zip(positions, delta)}},
              "readers": {}}
    for r in readers:
        lens = read_lens(models[r], vectors, tokenizer, spec.top_tokens)
        result["readers"][r] = {"overall": lens[0],
                                "per_position": {str(p): e for p, e in zip(positions, lens[1:])}}
    return result


def top_tokens(result: dict, reader: str | None = None, kind: str = "promoted") -> list[str]:
    """The overall list of one reader (default the fine-tuned model) as token strings."""
    return [t["token"] for t in result["readers"][reader or result["ft"]]["overall"][kind]]


def _md_cell(s: str) -> str:
    return "`" + s.replace("`", "'").replace("|", "\\|").replace("\n", "\\n") + "`"


def write_lens(result: dict, out_dir: str | Path, *, name: str = "diff_lens") -> dict[str, Path]:
    """<name>.json (everything) and <name>.md (token tables per reader)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    atomic_write_json(paths["json"], result)
    lines = [f"# Activation-difference lens: {result['ft']} minus {result['base']}", "",
             f"Mean of h_{result['ft']} - h_{result['base']} at the {result['layer_note']}, positions "
             f"{result['positions']}, over {result['n_sequences']} sequences; |mean difference| "
             f"{result['difference_norm']['overall']:.4g}.", ""]
    for reader, lens in result["readers"].items():
        lines += [f"## Read through {reader}'s final norm and unembedding", "",
                  "| rank | promoted | logit | suppressed | logit |", "|---:|---|---:|---|---:|"]
        for i, (p, s) in enumerate(zip(lens["overall"]["promoted"], lens["overall"]["suppressed"]), 1):
            lines.append(f"| {i} | {_md_cell(p['token'])} | {p['logit']:.3g} | {_md_cell(s['token'])} | "
                         f"{s['logit']:.3g} |")
        lines += ["", "Per position (promoted, best first):", "", "| position | tokens |", "|---:|---|"]
        for pos, e in lens["per_position"].items():
            lines.append(f"| {pos} | " + " ".join(_md_cell(t["token"]) for t in e["promoted"]) + " |")
        lines.append("")
    atomic_write_text(paths["md"], "\n".join(lines))
    return paths


def count_marked(tokens: Sequence[str], text_a: str, text_b: str, ratio: float = 5) -> int:
    """How many of `tokens` (decoded token strings, e.g. " unto" with its leading space) are at least
    `ratio` times more frequent in text A than in text B.

    A token's frequency in a text is its count as an exact substring (case-sensitive,
    non-overlapping) per character of the text, add-one smoothed: (count + 1) / len(text), so a token
    absent from B still needs `ratio` - 1 occurrences' worth of weight in A. Tokens that are only
    whitespace (or empty) are never marked.
    """
    if not text_a or not text_b:
        raise ValueError("count_marked needs two non-empty texts")
    n = 0
    for t in tokens:
        if not t.strip():
            continue
        rate_a = (text_a.count(t) + 1) / len(text_a)
        rate_b = (text_b.count(t) + 1) / len(text_b)
        n += rate_a >= ratio * rate_b
    return n


def text_windows(tokenizer, texts: Sequence[str], n: int, length: int, *, bos: bool = True) -> Tensor:
    """[n, length] evenly spaced windows of the texts' tokens (paragraphs joined with EOS); with
    `bos` and a tokenizer that has one, each window is BOS + length - 1 text tokens."""
    paragraphs = [p.strip() for t in texts for p in t.split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError("the texts hold no paragraphs to read")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in doc + eos], dtype=torch.long)
    lead = [tokenizer.bos_token_id] if bos and tokenizer.bos_token_id is not None else []
    body = length - len(lead)
    span = stream.numel() - body
    if span < 0 or body < 1:
        raise ValueError(f"the texts have {stream.numel()} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, span, n).long()
    lead_t = torch.tensor(lead, dtype=torch.long)
    return torch.stack([torch.cat([lead_t, stream[s:s + body]]) for s in starts.tolist()])


def run_difference_lens(cfg, spec: DiffLensSpec | None, out_dir: str | Path, *,
                        device: str | torch.device | None = None, progress: bool = True,
                        log: Callable[..., None] | None = None) -> dict:
    """The lens on an experiment's two models: on windows of spec.text_paths, or else on the first
    positions of the token set's validation sequences. Writes diff_lens.json and diff_lens.md."""
    from pipeline import experiment as E
    from pipeline import models as M
    from pipeline import store as S

    spec = spec or DiffLensSpec()
    log = log or (lambda *_: None)
    names = [m.name for m in cfg.models]
    base = spec.base or next(n for n in names if n != spec.ft)
    ft = spec.ft or next(n for n in names if n != base)
    dev = M.resolve_device(device if device is not None else spec.device)
    tokenizer = M.load_tokenizer(cfg.model(ft))
    if spec.text_paths:
        texts = [Path(p).read_text(encoding="utf-8") for p in spec.text_paths]
        ids = text_windows(tokenizer, texts, spec.n_sequences, spec.n_positions, bos=spec.prepend_bos)
        source = {"texts": list(spec.text_paths), "prepend_bos": spec.prepend_bos}
    else:
        ts = S.open_token_set(S.StoreRoot(cfg.store, cfg.storage_options), E.resolve_token_set(cfg).id)
        first = ts.n_train_sequences
        ids = torch.from_numpy(np.asarray(ts.tokens[first:first + spec.n_sequences], dtype=np.int64))
        source = {"tokenset_id": ts.id, "validation_sequences": int(ids.shape[0])}
    models = {n: M.load_model(cfg.model(n), device=dev).model for n in dict.fromkeys([base, ft, *spec.readers])}
    result = difference_lens(models, ids, tokenizer, dataclasses.replace(spec, base=base, ft=ft), progress=progress)
    result["source"] = source
    paths = write_lens(result, out_dir)
    result["files"] = {k: p.name for k, p in paths.items()}
    log(f"difference lens ({result['layer_note']}): {ft} - {base} promotes "
        + " ".join(repr(t) for t in top_tokens(result)[:10]))
    return result
