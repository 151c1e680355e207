"""The model diff of one trained dictionary: what differs between the models, latent by latent.

`analyse_dictionary` reads a training output and the store, runs the analyses that apply and
writes their files: for a crosscoder the decoder norms (evals/decoder_norms.py, plotted by
evals/plots.py) choose the most model-specific latents; for an SAE cached on several models, the
firing statistics on each (evals/activations.py) rank the latents that fire more or less on the
other models. One scan of the validation tokens gives the statistics and the top contexts of
the chosen latents; latents.html (evals/latent_page.py) shows them, diff.json sums them up.

An SAE of model A run on model B. Each model's rows are stored normalized by its own scale
(s_A h_A, s_B h_B; pipeline/store/scales.py), so B's stored rows are not what the SAE saw in
training units: in A's units B's activation is s_A h_B = stored_B * s_A / s_B. That is the default
(`[eval] transfer_units = "source"`), as the published transfer studies (a base model's SAE on its
chat model; Gemma Scope on the instruction-tuned model) feed the raw activations the SAE was
trained on: thresholds and biases are absolute, so dividing out B's overall size would change
which latents fire. `"stored"` feeds B's own normalized rows instead (each model at mean norm
sqrt(d_model)). diff.json records the convention and each factor.

Dead latents. A crosscoder's latents that are dead in the training sense (silent for
`dead_after_tokens` training tokens when training ended; trainer.trained.TrainedDictionary.
dead_mask) stay out of the decoder-norm classes and histograms: never trained, their decoders sit
at r = 0.5. A dictionary that does not record it (older runs, imported ones) has the latents
silent on the scanned tokens left out instead, and diff.json says which definition was used.
relative_norms.csv has every latent's decoder norms, both relative norms, class and dead flags.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evals.config import EvalExperiment as ExperimentConfig
from evals.config import EvalSpec
from pipeline import experiment as E
from pipeline import store as S
from pipeline.records import atomic_write_text
from trainer.trained import open_trained

from . import latent_page as P
from .activations import JOINT, ActivationStats, context_snippets, rank_increase, scan_activations, store_batches
from .by_source import source_names
from .decoder_norms import DELTA, FORMULAS, NormAnalysis, R, decoder_norm_analysis, norm_table, rank_specific
from .plots import norm_svgs, write_activation_scatter, write_norm_plots
from .stored_reconstruction import reconstruction_by_source
from .token_classes import TokenTable, token_table


@dataclass
class _Inputs:
    """A trained dictionary and the arrays it is applied to, with the validation tokens."""

    dictionary: object
    meta: dict
    name: str
    token_set: S.TokenSet
    columns: list[str]  # code columns: the models (SAE) or [JOINT] (crosscoder)
    arrays: list[S.ActivationArray]  # the inputs, in the order encode_columns takes them
    tokens: np.ndarray  # [n_seq, ctx] the scanned validation sequences
    first_seq: int  # their index in the token set
    include_first: bool
    factors: list[float]  # per array: what its stored rows are multiplied by (module docstring)
    dead_mask: np.ndarray | None  # [n_latents] training-dead latents; None when not recorded
    dead_latents: int | None  # their count (also known from config.json without the mask)
    dead_after_tokens: int | None


def transfer_factor(scale_a: float, scale_b: float, units: str) -> float:
    """What model B's stored rows (s_B h_B) are multiplied by to feed a dictionary of model A:
    s_A / s_B for units "source" (A's units: s_A h_B), 1 for "stored"."""
    if units == "source":
        return float(scale_a) / float(scale_b)
    if units == "stored":
        return 1.0
    raise ValueError(f"transfer_units must be 'source' or 'stored', got {units!r}")


def _open_inputs(dict_dir: Path, cfg: ExperimentConfig, n_sequences: int | None, device, log,
                 units: str, scan_rows: int) -> _Inputs:
    trained = open_trained(dict_dir, cfg, device=device)
    meta, name, dictionary, root, ts = (trained.meta, trained.name, trained.dictionary, trained.root,
                                        trained.token_set)
    names = trained.models
    arrays = list(trained.arrays)
    columns = [JOINT] if dictionary.n_models > 1 else list(names)
    factors = [1.0] * len(arrays)
    if dictionary.n_models == 1:  # the SAE on every other model cached at the same hook and width
        hook = E.hook_by_label(cfg, meta["hook"])
        for m in cfg.models:
            if m.name in names:
                continue
            try:
                arr = E.find_array(root, ts.id, m, hook, cfg.source_file)
            except S.StoreError as e:
                log(f"{name}: not comparing with {m.name} ({e})")
                continue
            if arr.array.shape[1] != dictionary.d_model:
                log(f"{name}: not comparing with {m.name} (d_model {arr.array.shape[1]} != {dictionary.d_model})")
                continue
            factor = transfer_factor(trained.scales[0], arr.scale, units)
            columns.append(m.name)
            arrays.append(arr)
            factors.append(factor)
            log(f"{name}: SAE of {names[0]} run on {m.name}'s activations "
                + (f"in {names[0]}'s units (stored rows x s_{names[0]} / s_{m.name} = {factor:.6g}; "
                   "transfer_units = 'source')" if units == "source" else
                   f"as stored, in {m.name}'s own normalization (transfer_units = 'stored')"))
    first = ts.n_train_sequences
    if n_sequences is None:
        n_sequences = -(-scan_rows // ts.context_length)
    n_seq = min(n_sequences, ts.n_sequences - first)
    if n_seq <= 0:
        raise ValueError(f"token set {ts.id} has no validation sequences to analyse")
    mask = trained.dead_mask()
    return _Inputs(dictionary, meta, name, ts, columns, arrays, np.asarray(ts.tokens[first:first + n_seq]),
                   first, trained.include_first_position, factors, None if mask is None else mask.cpu().numpy(),
                   trained.dead_latents, trained.dead_after_tokens)


def _check_tokenizer(tokenizer, ts: S.TokenSet, log) -> None:
    from pipeline import models as M

    fp = ts.attrs.get("tokenizer_fingerprint")
    if not fp or isinstance(tokenizer, TokenTable):
        return
    try:
        same = M.tokenizer_fingerprint(tokenizer) == fp
    except Exception:  # noqa: BLE001 - a tokenizer without a fast backend: nothing to compare
        return
    if not same:
        log(f"the tokenizer passed in is not token set {ts.id}'s (fingerprints differ); snippets may be "
            "decoded wrongly")


def analyse_dictionary(dict_dir: str | Path, cfg: ExperimentConfig, eval_spec: EvalSpec | None,
                       out_dir: str | Path, tokenizer, *, n_sequences: int | None = None,
                       device: str | torch.device = "cpu", progress: bool = True,
                       log: Callable[..., None] | None = None) -> dict:
    """Run the analyses that apply to one trained dictionary and write them to `out_dir`.

    Crosscoder: decoder norms (relative_norms.png/.html/.csv, shared_cosine.png), one scan of the
    validation tokens on the joint input, and latents.html with the most model-specific latents
    of each model and their top contexts. SAE: when other experiment models are cached at the
    same hook with the same d_model, the SAE is applied to each (config.json's model is A, every
    other model a B, fed in the units `transfer_units` names): activation_stats.csv,
    activation_scatter.png, and latents.html with the latents that fire more (and less) on each B.
    Always diff.json: the summary, also returned.

    The first `n_sequences` validation sequences are scanned (default: as many as hold
    eval_spec.scan_rows tokens, the whole split when it is smaller). The same rows give
    `reconstruction_by_source` (evals/stored_reconstruction.py): explained variance per model and
    per token-set source, with no forward pass.
    `tokenizer` is the token set's tokenizer (or a TokenTable); `log` gets notes (skipped models,
    the units other models are fed in).
    """
    from pipeline import models as M

    log = log or (lambda *_: None)
    spec = eval_spec or cfg.eval or EvalSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = M.resolve_device(device)
    inp = _open_inputs(Path(dict_dir), cfg, n_sequences, dev, log, spec.transfer_units, spec.scan_rows)
    dictionary, meta, name, columns = inp.dictionary, inp.meta, inp.name, inp.columns
    is_cc = dictionary.n_models > 1
    table = token_table(tokenizer)
    _check_tokenizer(tokenizer, inp.token_set, log)
    ctx = inp.token_set.context_length
    summary: dict = {"dictionary": name, "dict_dir": str(dict_dir), "architecture": meta["architecture"],
                     "kind": f"{dictionary.n_models}-model crosscoder" if is_cc else "SAE",
                     "models": list(meta["models"]), "compared_with": columns[1:], "hook": meta["hook"],
                     "n_latents": dictionary.n_latents, "tokenset_id": inp.token_set.id,
                     "validation_sequences": len(inp.tokens), "first_position_included": inp.include_first,
                     "dead_latents": inp.dead_latents,
                     "dead_latents_definition": _dead_definition(inp), "files": {}}
    if not is_cc:
        summary["transfer_units"] = spec.transfer_units
        summary["input_factors"] = dict(zip(columns, inp.factors))

    # crosscoder: the decoder norms say which latents to show before the scan when the training
    # dead mask is known; otherwise the silent latents stand in for it, known only after the scan,
    # so (as for an SAE, whose ranking needs the scan's statistics) every latent's top-k is kept
    analysis = None
    if is_cc and inp.dead_mask is not None:
        analysis = decoder_norm_analysis(dictionary.W_dec, meta["models"], spec, dead=inp.dead_mask,
                                         dead_definition=_dead_definition(inp))
        chosen = rank_specific(analysis, spec.top_latents)
        track = {JOINT: sorted({int(j) for ids in chosen.values() for j in ids})}
    else:
        track = {c: None for c in columns}

    def batches(progress: bool = False):
        return store_batches(inp.arrays, inp.tokens, inp.first_seq * ctx,
                             batch_rows=max(256, min(16384, (1 << 24) // dictionary.n_latents)),
                             include_first_position=inp.include_first, progress=progress, factors=inp.factors)

    result = scan_activations(
        dictionary, batches(progress),
        columns=columns, class_lookups={c.name: table.lookup(c) for c in spec.token_classes},
        top_k=spec.contexts_per_latent, track=track, device=dev)
    stats = result.stats
    silent = stats.freq.max(0) == 0
    summary["n_tokens"] = stats.n_tokens
    summary["silent_on_eval"] = int(silent.sum())
    summary["silent_on_eval_tokens"] = stats.n_tokens
    summary["token_classes"] = {c: s.n_tokens for c, s in stats.by_class.items()}
    first = inp.token_set.n_train_sequences
    summary["reconstruction_by_source"] = reconstruction_by_source(
        dictionary, batches, np.asarray(inp.token_set.source[first:first + len(inp.tokens)]),
        source_names(inp.token_set.attrs), columns, list(meta["models"]), ctx, device=dev)
    if is_cc:
        if analysis is None:
            definition = f"silent on the {stats.n_tokens} scanned validation tokens (no training record)"
            log(f"{name}: no training dead-latent record; leaving out the {int(silent.sum())} latents "
                f"{definition} from the decoder-norm classes")
            analysis = decoder_norm_analysis(dictionary.W_dec, meta["models"], spec, dead=silent,
                                             dead_definition=definition)
            chosen = rank_specific(analysis, spec.top_latents)
        paths = write_norm_plots(analysis, out, title=name)
        paths["relative_norms_csv"] = write_norm_csv(out / "relative_norms.csv", analysis, inp.dead_mask, silent)
        summary["files"].update({key: p.name for key, p in paths.items()})
        summary.update(analysis.summary())

    def snippets(column: str, latents) -> dict[int, list[P.Snippet]]:
        return context_snippets(result.top[column], latents, inp.tokens, table,
                                context_tokens=spec.context_tokens, seq_offset=inp.first_seq,
                                row_offset=inp.first_seq * ctx)

    if is_cc:
        groups = [_crosscoder_group(analysis, i, ids, stats, snippets(JOINT, ids)) for i, ids in chosen.items()]
        counts = analysis.counts
        figures = norm_svgs(analysis, title=name)
    else:
        groups, counts = _sae_groups(stats, spec.top_latents, snippets, out, summary, log)
        if inp.dead_latents is not None:
            counts["dead (training)"] = inp.dead_latents
        summary["counts"] = counts
        figures = []

    page_summary = [("dictionary", f"{name} ({meta['architecture']}, {dictionary.n_latents} latents)"),
                    ("kind", summary["kind"]), ("models", ", ".join(meta["models"])),
                    ("compared with", ", ".join(columns[1:]) or "\u2013"),
                    ("hook", meta["hook"]), ("token set", inp.token_set.id),
                    ("tokens scanned", (f"{stats.n_tokens} ({len(inp.tokens)} validation sequences"
                                        f"{'' if inp.include_first else ', position 0 skipped'})")),
                    ("dead latents", f"{_show_count(inp.dead_latents)} ({_dead_definition(inp)})"),
                    ("silent on the scanned tokens", str(int(silent.sum())))]
    if not is_cc and columns[1:]:
        page_summary.append(("units of the other models", _units_note(spec.transfer_units, columns, inp.factors)))
    if analysis is not None:
        page_summary.append(("class rule", json.dumps(analysis.thresholds)))
        page_summary.append(("left out of the classes as dead", analysis.dead_definition))
    page_summary += [(f"token class {c}", f"{s.n_tokens} tokens") for c, s in stats.by_class.items()]
    P.write_latent_page(out / "latents.html", f"{name}: model diff", page_summary, groups,
                        figures=figures, counts=counts, browser="browser")
    summary["files"]["latents_html"] = "latents.html"
    summary["groups"] = {g.title: [c.latent for c in g.cards] for g in groups}
    summary["files"]["diff_json"] = "diff.json"
    atomic_write_text(out / "diff.json", json.dumps(summary, indent=1, default=_json_default))
    return summary


def _show_count(n: int | None) -> str:
    return "unknown" if n is None else str(n)


def _dead_definition(inp: _Inputs) -> str:
    if inp.dead_mask is not None or inp.dead_latents is not None:
        return f"silent for >= {inp.dead_after_tokens} training tokens when training ended (dead_after_tokens)"
    return "unknown: the dictionary folder records no training activity (older run or imported)"


def _units_note(units: str, columns: list[str], factors: list[float]) -> str:
    a = columns[0]
    if units == "stored":
        return "each model's own normalized rows (transfer_units = 'stored')"
    return (f"{a}'s units: stored rows x s_{a} / s_B (transfer_units = 'source'; "
            + ", ".join(f"{b} x {f:.4g}" for b, f in zip(columns[1:], factors[1:])) + ")")


def write_norm_csv(path: str | Path, a: NormAnalysis, dead_mask: np.ndarray | None, silent: np.ndarray) -> Path:
    """relative_norms.csv: one row per latent (decoder_norms.norm_table has the columns)."""
    header, rows = norm_table(a, dead_mask, silent)
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([header, *rows])
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _crosscoder_group(a: NormAnalysis, i: int, ids: np.ndarray, stats: ActivationStats,
                      snips: dict[int, list[P.Snippet]]) -> P.LatentGroup:
    names, jc = a.model_names, stats.col(JOINT)
    cards = []
    for j in map(int, ids):
        shares = a.shares[j]
        facts: list[tuple[str, object]] = [(f"class (by {a.thresholds.get('convention', 'share')})",
                                             a.classes[j])]
        if a.n_models == 2:
            facts += [(FORMULAS[R], float(a.relative[j])), (FORMULAS[DELTA], float(a.delta[j]))]
        facts += [(f"decoder norm, {n}", float(a.norms[j, t])) for t, n in enumerate(names)]
        facts += [(f"share, {n}", float(shares[t])) for t, n in enumerate(names)]
        facts += [("decoder cosine", float(a.cosine[j])),
                  ("firing frequency (joint)", float(stats.freq[jc, j])),
                  ("mean activation when active", float(stats.mean_active[jc, j]))]
        facts += [(f"[{c}] firing frequency", float(cs.freq[jc, j])) for c, cs in stats.by_class.items()]
        head = (f"r = {shares[1]:.3f}, delta = {a.delta[j]:.3f}" if a.n_models == 2
                else "shares " + " / ".join(f"{s:.2f}" for s in shares))
        cards.append(P.LatentCard(j, a.classes[j], head, facts, snips[j]))
    return P.LatentGroup(f"Most specific to {names[i]}",
                         f"Live latents whose largest decoder-norm share is {names[i]}'s, by share - 1/n "
                         f"(|r - 0.5| for two models), most specific first.", cards)


def _sae_groups(stats: ActivationStats, top: int, snippets, out: Path, summary: dict, log
                ) -> tuple[list[P.LatentGroup], dict[str, int]]:
    """The SAE's groups (more / less active on each other model), writing the CSV and scatter."""
    a, others = stats.columns[0], stats.columns[1:]
    groups, counts = [], {}
    if not others:
        log(f"{summary['dictionary']}: no other model is cached at {summary['hook']}; showing the most "
            "frequent latents")
        ids = np.argsort(-stats.freq[0], kind="stable")[:top]
        ids = ids[stats.freq[0, ids] > 0]
        groups.append(_sae_group(f"Most frequent latents on {a}", a, ids, stats, a, None, snippets(a, ids)))
    else:
        ups = {b: rank_increase(stats, a, b, metric="freq", top=top) for b in others}
        summary["files"]["activation_stats_csv"] = write_activation_csv(
            out / "activation_stats.csv", stats, a, others, top=top).name
        summary["files"]["activation_scatter_png"] = write_activation_scatter(
            out / "activation_scatter.png", stats, a, others, highlight=ups).name
        summary["activation"] = {}
        for b in others:
            downs = rank_increase(stats, a, b, metric="freq", top=top, decrease=True)
            groups.append(_sae_group(f"Fires more on {b} than on {a}", b, ups[b], stats, a, b, snippets(b, ups[b])))
            groups.append(_sae_group(f"Fires less on {b} than on {a}", a, downs, stats, a, b, snippets(a, downs)))
            fa, fb = stats.freq[stats.col(a)], stats.freq[stats.col(b)]
            counts[f"more often on {b}"] = int((fb > fa).sum())
            counts[f"less often on {b}"] = int((fb < fa).sum())
            summary["activation"][b] = {"l0_A": float(fa.sum()), "l0_B": float(fb.sum()),
                                        "top_freq_increase": [int(j) for j in ups[b][:10]]}
    counts["silent on the scanned tokens"] = int((stats.freq.max(0) == 0).sum())
    return groups, counts


_ARROW = " \u2192 "


def _sae_group(title: str, column: str, ids, stats: ActivationStats, a: str, b: str | None,
               snips: dict[int, list[P.Snippet]]) -> P.LatentGroup:
    cols = [a] if b is None else [a, b]
    cards = []
    for j in map(int, ids):
        facts = []
        for f, label in (("freq", "firing frequency"), ("mean", "mean activation"),
                         ("mean_active", "mean when active")):
            facts += [(f"{label}, {c}", float(getattr(stats, f)[stats.col(c), j])) for c in cols]
        for cls, cs in stats.by_class.items():
            facts += [(f"[{cls}] firing frequency, {c}", float(cs.freq[cs.col(c), j])) for c in cols]
        head = _ARROW.join(f"{stats.freq[stats.col(c), j]:.2g}" for c in cols)
        cards.append(P.LatentCard(j, "firing frequency " + _ARROW.join(cols), head, facts, snips.get(j, [])))
    return P.LatentGroup(title, f"Contexts are the top activations on {column}'s activations.", cards)


_STAT_FIELDS = ("freq", "mean", "mean_active")


def write_activation_csv(path: str | Path, stats: ActivationStats, a: str, others: Sequence[str], *,
                         top: int) -> Path:
    """The `top` latents by increase in firing frequency, then by increase in mean activation,
    from column a to each other column b: one row per (ranking, b, latent)."""
    classes = list(stats.by_class)
    header = ["ranking", "model_A", "model_B", "rank", "latent", "freq_A", "freq_B", "mean_A", "mean_B",
              "mean_active_A", "mean_active_B", "delta"]
    header += [f"{c}/{f}_{s}" for c in classes for f in _STAT_FIELDS for s in "AB"]
    path = Path(path)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(header)
    for b in others:
        ia, ib = stats.col(a), stats.col(b)
        for metric in ("freq", "mean"):
            values = getattr(stats, metric)
            for rank, j in enumerate(rank_increase(stats, a, b, metric=metric, top=top), 1):
                row = [metric, a, b, rank, int(j)]
                for f in _STAT_FIELDS:
                    arr = getattr(stats, f)
                    row += [f"{arr[ia, j]:.6g}", f"{arr[ib, j]:.6g}"]
                row.append(f"{values[ib, j] - values[ia, j]:.6g}")
                for c in classes:
                    cs = stats.by_class[c]
                    for f in _STAT_FIELDS:
                        arr = getattr(cs, f)
                        row += [f"{arr[ia, j]:.6g}", f"{arr[ib, j]:.6g}"]
                w.writerow(row)
    atomic_write_text(path, buf.getvalue())
    return path
