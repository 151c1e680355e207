"""Splice evaluations: how much of each model's next-token behaviour a dictionary preserves.

For one saved dictionary (an SAE or an n-way crosscoder), over the first `n_sequences` sequences
of the token set's validation split:

* The dictionary reads every model's *stored* (normalized) activation at the same token, so a
  crosscoder sees all models at once without running any of them for its input.
* Each model then runs once per batch on 4*b sequences, the token ids stacked four times, with the
  hooked residual stream at positions >= 1 edited per block of b rows:

      clean          the model's own activation h (no edit)
      spliced        h + (x_hat - x) / scale       (see "Spliced value" below)
      zero ablation  0
      mean ablation  mean raw activation over the evaluated tokens (positions >= 1)

  Position 0 always keeps the model's own activation: it is the attention sink, outside the
  dictionary's training distribution (the trainer skips it), and the reference notebooks splice
  `act[:, 1:]` too. Zero and mean ablation keep it as well (the Gemma crosscoder notebook zeroes
  position 0 too, which makes its ablated CE, and so its CE recovered, a little larger), so that
  the three edited variants differ from the clean run at exactly the same positions. Stacking the
  variants in one forward pays the per-call overheads once.

Spliced value. With x the stored normalized activation and x_hat its reconstruction, the spliced
activation is `h + (x_hat - x) / scale`, i.e. `x_hat / scale` plus the rounding the store applied
to h (`h - x / scale`: bfloat16 rounding, or the float32 rounding of `h * scale / scale`). Only the
dictionary's own error therefore enters the model, and a dictionary that reconstructs its input
exactly leaves the forward *bit-identical* (delta CE and KL exactly 0). `splice="replace"` puts
`x_hat / scale` in instead, as SAELens-style evaluations do; the two differ by the storage
rounding only (about 0.4% of the norm with bfloat16 storage).

Metrics (names follow SAELens / SAEBench "core" where one exists). Next-token predictions are
scored at positions 1..T-2 (targets tokens 2..T-1): position 0's prediction depends on position 0
alone, which no variant edits, so it would only dilute every difference; position T-1 has no
target. Per model:

    ce_loss_without_sae / _with_sae / _with_ablation / _with_mean_ablation
                       mean next-token cross entropy (nats) of clean / spliced / zero / mean
    ce_diff            = ce_loss_with_sae - ce_loss_without_sae
    ce_loss_score      = 1 - (ce_with_sae - ce_clean) / (ce_with_ablation - ce_clean)  (CE recovered)
    kl_div_with_sae    = mean over predictions of KL(p_clean || p_spliced)   (nats; each
                         prediction's KL clamped at 0 against rounding)
    kl_div_with_ablation = the same against zero ablation
    kl_div_score       = 1 - kl_div_with_sae / kl_div_with_ablation

Reconstruction, on the evaluated tokens (positions >= 1), in normalized units:

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (mean: per dimension over
                         the evaluated tokens. Not about zero, 1 - sum ||x - x_hat||^2 / sum ||x||^2,
                         as some public notebooks compute it: residual streams have a large mean,
                         which that form counts as explained; and a ratio of sums, not the mean of
                         per-token ratios, which explodes for tokens near the mean)
    mse                = mean over tokens of sum_d (x - x_hat)^2
    cossim             = mean cos(x, x_hat);  l2_norm_in / l2_norm_out = mean ||x|| / ||x_hat||
    l2_ratio           = mean ||x_hat|| / ||x||                             (shrinkage below 1)
    store_rel_error    = sqrt(sum ||h * scale - x||^2 / sum ||x||^2): the live clean activation
                         against the stored one (storage rounding, or another compute dtype);
                         above 0.25 the store does not hold these models' activations: an error

Joint over the models: explained_variance (sums over all models) and mse (sum over models and
dimensions, as the trainer's mse). Dictionary: l0 (mean latents active per token), dead_latents
(latents never active on the evaluated tokens), n_latents. Every mean is a ratio of sums over all
batches, never a mean of batch means.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from evals.config import EvalExperiment as ExperimentConfig
from pipeline import models as M
from pipeline import store as S
from pipeline.config import HookSpec
from trainer.dictionaries import Dictionary
from trainer.trained import TrainedDictionaryError, check_model_identity, open_trained

SPLICE_FILE = "splice.json"
VARIANTS = ("clean", "spliced", "zero_ablation", "mean_ablation")
STORE_MISMATCH_LIMIT = 0.25  # store_rel_error above this: the stored rows are not these activations
_LOGIT_ELEMENTS = 1 << 24  # float32 logits per variant materialised at once (64 MiB)
_CODE_ELEMENTS = 1 << 26  # dictionary codes materialised at once (256 MiB)
_EPS = 1e-12
class SpliceError(TrainedDictionaryError):
    """The dictionary cannot be spliced into its models (e.g. an imported cache without weights)."""


# ----------------------------------------------------------------------------------------------
# Reconstruction statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class ReconstructionStats:
    """Sums over tokens for one model's reconstruction (or several models' pooled).

    `update(x, x_hat, mean)` takes [tokens, d] (or [tokens, n_models, d], pooled as one vector of
    n_models*d) and the per-dimension mean of x over *all* evaluated tokens, computed beforehand,
    so that the variance is about the mean exactly and not via sum x^2 - N mean^2.
    """

    n: int = 0
    sq_err: float = 0.0
    sq_dev: float = 0.0
    cos: float = 0.0
    norm_in: float = 0.0
    norm_out: float = 0.0
    ratio: float = 0.0

    def update(self, x: Tensor, x_hat: Tensor, mean: Tensor) -> None:
        x, x_hat = x.float().flatten(1), x_hat.float().flatten(1)
        mean = mean.to(x).flatten()
        n_in, n_out = x.norm(dim=1), x_hat.norm(dim=1)
        sums = torch.stack([
            (x - x_hat).pow(2).sum(),
            (x - mean).pow(2).sum(),
            F.cosine_similarity(x, x_hat, dim=1, eps=1e-8).sum(),
            n_in.sum(),
            n_out.sum(),
            (n_out / n_in.clamp_min(_EPS)).sum(),
        ]).tolist()  # one host sync per update; accumulated in Python floats (double)
        self.n += x.shape[0]
        self.sq_err += sums[0]
        self.sq_dev += sums[1]
        self.cos += sums[2]
        self.norm_in += sums[3]
        self.norm_out += sums[4]
        self.ratio += sums[5]

    def explained_variance(self) -> float:
        return 1.0 - self.sq_err / self.sq_dev if self.sq_dev > 0 else math.nan

    def metrics(self) -> dict[str, float]:
        n = max(self.n, 1)
        return {"explained_variance": self.explained_variance(), "mse": self.sq_err / n,
                "cossim": self.cos / n, "l2_norm_in": self.norm_in / n,
                "l2_norm_out": self.norm_out / n, "l2_ratio": self.ratio / n}


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the rows of x (the evaluator's formula)."""
    stats = ReconstructionStats()
    stats.update(x, x_hat, x.float().mean(0))
    return stats.explained_variance()


# ----------------------------------------------------------------------------------------------
# Splicing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splice:
    """What one variant puts at positions >= 1 of the hooked site (raw units, the model's scale).

    kind "keep": nothing (the clean run); "set": `value` ([b, T-1, d], or anything broadcasting to
    it, e.g. a [d] mean or a 0-d zero); "add": the model's own activation plus `value`.
    """

    kind: Literal["keep", "set", "add"]
    value: Tensor | None = None

    def write(self, out: Tensor, h: Tensor) -> None:
        """Write this variant's positions >= 1 into `out` (a copy of h, [b, T, d])."""
        if self.kind == "set":
            out[:, 1:] = self.value.to(device=h.device, dtype=h.dtype)
        elif self.kind == "add":
            out[:, 1:] = (h[:, 1:].float() + self.value.to(h.device)).to(h.dtype)
        elif self.kind != "keep":
            raise ValueError(f"unknown splice kind {self.kind!r}")

    def apply(self, h: Tensor) -> Tensor:
        """h: [b, T, d] of this variant; returns the edited copy (h itself for keep)."""
        if self.kind == "keep":
            return h
        out = h.clone()
        self.write(out, h)
        return out


def _edit_stacked(h: Tensor, splices: Sequence[Splice]) -> Tensor:
    """h: [V*b, T, d], variant j in rows [j*b, (j+1)*b). A copy with every variant's edit."""
    b = h.shape[0] // len(splices)
    out = h.clone()
    for j, s in enumerate(splices):
        s.write(out[j * b:(j + 1) * b], h[j * b:(j + 1) * b])
    return out


def _register_edit(model: nn.Module, hook: HookSpec, edit: Callable[[Tensor], Tensor]):
    """A hook that replaces the residual stream at `hook` by edit(h); returns its handle."""
    layer = M.decoder_layers(model)[hook.layer]
    if hook.site == "resid_pre":
        def pre(_m, args, kwargs):
            if args:
                return (edit(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
        return layer.register_forward_pre_hook(pre, with_kwargs=True)
    if hook.site == "resid_post":
        def post(_m, _args, output):
            if isinstance(output, Tensor):
                return edit(output)
            return (edit(output[0]), *output[1:])  # bloom (and transformers 4): keep the tuple
        return layer.register_forward_hook(post)
    raise ValueError(f"hook {hook.label}: unknown site {hook.site!r}; use one of {M.SUPPORTED_SITES}")


def _final_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """The last hidden state (after the final norm), the LM head's input: no [b, T, vocab] logits."""
    out = model.base_model(input_ids=ids, use_cache=False)
    return out[0]


def spliced_final_hidden(model: nn.Module, ids: Tensor, hook: HookSpec, splices: Sequence[Splice],
                         *, batched: bool = True,
                         observe: Callable[[Tensor], None] | None = None) -> Tensor:
    """Final hidden states [V*b, T, d] of every variant of the b sequences `ids`, rows grouped by
    variant. batched: one forward over the ids stacked V times; else one forward per variant
    (the reference, for tests). `observe` sees the first variant's activation at the hook."""
    if batched:
        def edit(h: Tensor) -> Tensor:
            if observe is not None:
                observe(h[: ids.shape[0]])
            return _edit_stacked(h, splices)
        handle = _register_edit(model, hook, edit)
        try:
            return _final_hidden(model, ids.repeat(len(splices), 1))
        finally:
            handle.remove()
    outs = []
    for j, s in enumerate(splices):
        def edit(h: Tensor, s=s, first=j == 0) -> Tensor:
            if observe is not None and first:
                observe(h)
            return s.apply(h)
        handle = _register_edit(model, hook, edit)
        try:
            outs.append(_final_hidden(model, ids))
        finally:
            handle.remove()
    return torch.cat(outs)


def logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """final hidden -> float32 logits, as the CausalLM's forward computes them (incl. softcapping)."""
    head = model.get_output_embeddings()
    if head is None:
        raise SpliceError(f"model {M._model_name(model)!r} has no output embeddings (LM head)")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def logits(h: Tensor) -> Tensor:
        z = head(h).float()
        return torch.tanh(z / cap) * cap if cap else z
    return logits


@dataclass
class VariantLosses:
    """Sums over the scored predictions of b sequences, per variant (float64, on the CPU)."""

    nll: Tensor  # [V]: sum of -log p(next token)
    kl: Tensor  # [V]: sum of KL(p_variant0 || p_variant) (0 for variant 0)
    count: int  # predictions scored per variant


def variant_losses(model: nn.Module, final: Tensor, ids: Tensor, n_variants: int) -> VariantLosses:
    """Next-token losses of positions 1..T-2 (targets 2..T-1) from final hidden states [V*b, T, d].

    The LM head runs in chunks of positions so that [V, chunk, vocab] float32 logits stay small.
    """
    b, t = ids.shape
    h = final.view(n_variants, b, t, -1)[:, :, 1:t - 1].reshape(n_variants, b * (t - 2), -1)
    targets = ids[:, 2:].reshape(-1).to(h.device)
    logits = logits_fn(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, _LOGIT_ELEMENTS // vocab)
    nll, kl = [], []  # float32 sums per chunk, added up in float64 on the CPU at the end
    for lo in range(0, h.shape[1], step):
        logp = torch.log_softmax(logits(h[:, lo:lo + step]), dim=-1)  # [V, R, vocab]
        tgt = targets[lo:lo + step]
        nll.append(-logp.gather(-1, tgt.expand(n_variants, -1)[..., None]).squeeze(-1).sum(1))
        # KL(p0 || pj) = sum p0 (log p0 - log pj) per prediction, exactly 0 where log pj equals
        # log p0 bit for bit; clamped at 0 since rounding can make a near-zero KL slightly negative
        # in place on log pj (j >= 1, no longer needed): no [V-1, R, vocab] temporaries
        per_token = logp[1:].neg_().add_(logp[0]).mul_(logp[0].exp()).sum(-1)  # [V-1, R]
        kl.append(F.pad(per_token.clamp_min(0).sum(1), (1, 0)))  # variant 0: exactly 0
    return VariantLosses(torch.stack(nll).cpu().double().sum(0),
                         torch.stack(kl).cpu().double().sum(0), b * (t - 2))


# ----------------------------------------------------------------------------------------------
# Opening what the dictionary was trained on
# ----------------------------------------------------------------------------------------------


def _check_spliceable(meta: dict, cfg: ExperimentConfig, ts: S.TokenSet) -> None:
    """Splicing runs each model on the token set's tokens: imported caches may lack either."""
    problems = []
    weightless = [n for n in meta["models"] if not cfg.model(n).has_weights]
    if weightless:
        problems.append(
            f"model(s) {weightless} of {cfg.source_file or cfg.name!r} have no weights (imported only): "
            "splicing needs the model weights, since it runs each model with the reconstruction put "
            "in; give path, repo or gguf for each in its [[models]] entry (the checkpoint whose "
            "activations were imported), beside imported")
    why = ts.attrs.get("splicing", "available")
    if why != "available":
        problems.append(f"token set {ts.id}: splicing is {why} (recorded by mdiff import-cache)")
    if problems:
        raise SpliceError("cannot splice: " + "; ".join(problems))


def _load_models(meta: dict, cfg: ExperimentConfig, arrays: list[S.ActivationArray], device,
                 cache: dict | None) -> list[M.LoadedModel]:
    out = []
    for name, arr in zip(meta["models"], arrays):
        lm = cache.get(name) if cache is not None else None
        if lm is None:
            lm = M.load_model(cfg.model(name), device=device)
            if cache is not None:
                cache[name] = lm
        check_model_identity(name, lm.identity, arr)
        if lm.d_model != arr.array.shape[1]:
            raise SpliceError(f"model {name!r} has d_model {lm.d_model}, its array "
                              f"{arr.array.shape[1]}")
        out.append(lm)
    return out


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------


def _read_batch(arrays: list[S.ActivationArray], lo_row: int, hi_row: int) -> Tensor:
    """[rows, n_models, d] float32 normalized activations (same rows = same tokens in every array)."""
    return torch.stack([S.read_rows(a, lo_row, hi_row).float() for a in arrays], dim=1)


def _mean_over_tokens(arrays, seqs: range, ctx: int, batch_size: int) -> Tensor:
    """[n_models, d] float64 mean of the stored activations at positions >= 1 of `seqs`."""
    total, n = None, 0
    for lo in range(seqs.start, seqs.stop, batch_size):
        hi = min(lo + batch_size, seqs.stop)
        x = _read_batch(arrays, lo * ctx, hi * ctx).view(hi - lo, ctx, len(arrays), -1)[:, 1:]
        s = x.double().sum((0, 1))
        total = s if total is None else total + s
        n += x.shape[0] * x.shape[1]
    return total / n


@torch.no_grad()
def _encode_decode(dictionary: Dictionary, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x_hat [N, n, d], active-count sum (0-d), fired mask [n_latents]; codes in token chunks."""
    step = max(1, _CODE_ELEMENTS // dictionary.n_latents)
    x_hat, active, fired = [], torch.zeros((), dtype=torch.long, device=x.device), None
    for lo in range(0, x.shape[0], step):
        f = dictionary.encode(x[lo:lo + step])
        x_hat.append(dictionary.decode(f))
        on = f > 0
        active += on.sum()
        fired = on.any(0) if fired is None else fired | on.any(0)
    return torch.cat(x_hat), active, fired


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _jsonable(obj: Any) -> Any:
    """Non-finite floats become null: strict JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _stacked(stack_variants: bool | None, device) -> bool:
    """One forward of the 4 variants stacked (4b sequences) or four of b. A GPU is busier with
    the larger batch; on a CPU the four smaller forwards measured faster (BENCHMARKS.md)."""
    return torch.device(device).type == "cuda" if stack_variants is None else stack_variants


def evaluate_dictionary(dict_dir: str | os.PathLike, cfg: ExperimentConfig, *,
                        out_dir: str | os.PathLike | None, n_sequences: int, batch_size: int,
                        device: str | torch.device | None = "auto", progress: bool = True,
                        models_cache: dict | None = None,
                        splice: Literal["error", "replace"] = "error",
                        stack_variants: bool | None = None) -> dict:
    """Splice the dictionary saved in `dict_dir` into its models; returns (and writes
    `<out_dir>/splice.json`, unless out_dir is None) the metrics described in the module docstring.

    `models_cache` (model name -> LoadedModel) is filled and reused, so that evaluating a sweep
    loads each model once. `splice`: "error" (default) splices h + (x_hat - x) / scale, "replace"
    splices x_hat / scale (see the module docstring). `stack_variants` True runs the four
    variants as one forward of 4*b sequences, False as four forwards of b (same results); None
    (default) stacks on a GPU only: on a CPU the smaller forwards measured faster.
    """
    started = time.perf_counter()
    dict_dir = Path(dict_dir)
    if n_sequences < 1 or batch_size < 1:
        raise ValueError(f"n_sequences and batch_size must be >= 1, got {n_sequences}, {batch_size}")
    if splice not in ("error", "replace"):
        raise ValueError(f"splice must be 'error' or 'replace', got {splice!r}")
    target = M.resolve_device(device)
    trained = open_trained(dict_dir, cfg, device=target)
    meta, ts, arrays, hook, dictionary = (trained.meta, trained.token_set, trained.arrays, trained.hook,
                                          trained.dictionary)
    _check_spliceable(meta, cfg, ts)
    names = list(meta["models"])
    ctx = ts.context_length
    if ctx < 3:
        raise SpliceError(f"token set {ts.id} has context_length {ctx}; splice evaluations need "
                          ">= 3 (positions 1..T-2 are scored)")
    seqs = range(ts.n_train_sequences, min(ts.n_train_sequences + n_sequences, ts.n_sequences))
    if len(seqs) == 0:
        raise SpliceError(f"token set {ts.id} has no validation sequences (validation_fraction 0); "
                          "rebuild it with [tokens] validation_fraction > 0")
    lms = _load_models(meta, cfg, arrays, target, models_cache)
    scales = [float(s) for s in meta["scales"]]

    with torch.inference_mode():
        mean_norm = _mean_over_tokens(arrays, seqs, ctx, batch_size).float().to(target)  # [n, d]
        per_model = [ReconstructionStats() for _ in names]
        joint = ReconstructionStats()
        losses = [torch.zeros(2, len(VARIANTS), dtype=torch.float64) for _ in names]
        n_pred = 0
        store_err = [[0.0, 0.0] for _ in names]
        active_sum, fired = 0.0, torch.zeros(dictionary.n_latents, dtype=torch.bool, device=target)

        batches = range(seqs.start, seqs.stop, batch_size)
        bar = tqdm(batches, unit="batch", disable=not progress, dynamic_ncols=True,
                   desc=f"splice {meta.get('name', dict_dir.name)}")
        for i_batch, lo in enumerate(bar):
            hi = min(lo + batch_size, seqs.stop)
            b = hi - lo
            ids = torch.from_numpy(ts.tokens[lo:hi]).long()
            x = _read_batch(arrays, lo * ctx, hi * ctx).view(b, ctx, len(names), -1)[:, 1:]
            x = x.reshape(b * (ctx - 1), len(names), -1).to(target)
            x_hat, active, batch_fired = _encode_decode(dictionary, x)
            active_sum += float(active)
            fired |= batch_fired
            joint.update(x, x_hat, mean_norm)
            for i, (name, lm, s) in enumerate(zip(names, lms, scales)):
                xi, xi_hat = x[:, i], x_hat[:, i]
                per_model[i].update(xi, xi_hat, mean_norm[i])
                rec = (xi_hat - xi if splice == "error" else xi_hat) / s
                splices = [Splice("keep"),
                           Splice("add" if splice == "error" else "set", rec.view(b, ctx - 1, -1)),
                           Splice("set", torch.zeros((), device=target)),
                           Splice("set", mean_norm[i] / s)]
                xi_stored = xi.view(b, ctx - 1, -1).to(lm.device)

                def observe(h, i=i, s=s, xs=xi_stored):
                    d = h[:, 1:].float() * s - xs
                    store_err[i][0] += float(d.pow(2).sum())
                    store_err[i][1] += float(xs.pow(2).sum())

                ids_dev = ids.to(lm.device)
                final = spliced_final_hidden(lm.model, ids_dev, hook, splices,
                                             batched=_stacked(stack_variants, lm.device),
                                             observe=observe)
                vl = variant_losses(lm.model, final, ids_dev, len(splices))
                losses[i][0] += vl.nll
                losses[i][1] += vl.kl
                if i_batch == 0 and store_err[i][1] > 0:
                    rel = math.sqrt(store_err[i][0] / store_err[i][1])
                    if not rel <= STORE_MISMATCH_LIMIT:
                        raise SpliceError(
                            f"model {name!r}: its live activations at {hook.label} differ from the "
                            f"stored ones by {rel:.1%} of their norm ({arrays[i].path}): the store "
                            "does not hold this model's activations of these tokens")
            n_pred += vl.count
        bar.close()

    n_tokens = len(seqs) * (ctx - 1)
    results = {}
    for i, name in enumerate(names):
        nll, kl = (losses[i] / n_pred).tolist()
        clean, spliced, zero, mean = nll
        results[name] = {
            "ce_loss_without_sae": clean, "ce_loss_with_sae": spliced,
            "ce_loss_with_ablation": zero, "ce_loss_with_mean_ablation": mean,
            "ce_diff": spliced - clean,
            "ce_loss_score": 1.0 - _ratio(spliced - clean, zero - clean),
            "kl_div_with_sae": kl[1], "kl_div_with_ablation": kl[2],
            "kl_div_with_mean_ablation": kl[3],
            "kl_div_score": 1.0 - _ratio(kl[1], kl[2]),
            **per_model[i].metrics(),
            "store_rel_error": math.sqrt(_ratio(*store_err[i])),
        }
    seconds = time.perf_counter() - started
    spec = meta.get("spec", {})
    report = {
        "dictionary": meta.get("name", dict_dir.name),
        "experiment": meta.get("experiment"),
        "architecture": meta.get("architecture"),
        "spec": spec,
        "seed": spec.get("seed"),
        "models": names,
        "hook": meta["hook"],
        "tokenset_id": meta["tokenset_id"],
        "splice": splice,
        "n_sequences": len(seqs),
        "n_tokens": n_tokens,
        "metrics": {
            "per_model": results,
            "explained_variance": joint.explained_variance(),
            "mse": joint.sq_err / max(joint.n, 1),
            "l0": active_sum / n_tokens,
            "dead_latents": int((~fired).sum()),
            "n_latents": dictionary.n_latents,
            "n_tokens": n_tokens,
            "n_predictions": n_pred,
        },
        "ce_diff": {name: results[name]["ce_diff"] for name in names},
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else math.nan,
    }
    report = _jsonable(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (SPLICE_FILE + ".partial")
        tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        os.replace(tmp, out / SPLICE_FILE)
    return report
