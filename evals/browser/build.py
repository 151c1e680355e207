"""`build_browser`: one trained dictionary's latent browser, from the store.

Opens the dictionary with what it was trained on (trainer.trained), picks its columns (a
crosscoder: the joint input; an SAE: its model and every other experiment model cached at the
same hook and width), runs the collection pass, draws the examples and re-encodes their windows,
computes the model diff and (unless switched off, or a model has no weights) the logit effects,
and writes the pages (evals/browser/pages.py) and, if asked, the Neuronpedia batch files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from evals.by_source import source_names
from evals.config import EvalExperiment, EvalSpec
from evals.latent_page import display_token, svg_histogram
from evals.latent_scaling import EXCLUSIVE_CLASSES
from evals.token_classes import TokenTable, token_table
from pipeline import experiment as E
from pipeline import store as S
from pipeline.records import atomic_write_json
from trainer.trained import check_model_identity, open_trained

from .collect import Collection, ScanInputs, collect
from .examples import select_examples, window_activations
from .exports import write_neuronpedia
from .logit_effects import decoder_directions, lens_weights, logit_effects
from .modeldiff import SCALING_FILE, DiffStats, dead_mask, diff_stats, read_latent_scaling
from .pages import write_browser
from .records import Records, index_table
from .spec import BrowserSpec

BROWSER_DIR = "browser"
JOINT = "joint"


def scan_inputs(trained, cfg: EvalExperiment, log: Callable[..., None]) -> ScanInputs:
    """The trained dictionary's columns: joint for a crosscoder; for an SAE each model cached at
    its hook with its width (the SAE's own model first)."""
    d, ts = trained.dictionary, trained.token_set
    arrays, columns = list(trained.arrays), list(trained.models)
    if d.n_models > 1:
        groups = [list(range(len(arrays)))]
        columns = [JOINT]
    else:
        hook = E.hook_by_label(cfg, trained.meta["hook"])
        for m in cfg.models:
            if m.name in columns:
                continue
            try:
                arr = E.find_array(trained.root, ts.id, m, hook, cfg.source_file)
            except S.StoreError as e:
                log(f"{trained.name}: browser without {m.name} ({e})")
                continue
            if arr.d_model != d.d_model:
                log(f"{trained.name}: browser without {m.name} (d_model {arr.d_model} != {d.d_model})")
                continue
            columns.append(m.name)
            arrays.append(arr)
        groups = [[i] for i in range(len(arrays))]
    return ScanInputs(d, arrays, ts, columns, groups, trained.include_first_position, source_names(ts.attrs))


def placeholder_vocab(tokens: np.ndarray) -> list[str]:
    """Token ids as text, for a store whose tokenizer is not at hand."""
    return [f"<{i}>" for i in range(int(tokens.max()) + 1 if tokens.size else 0)]


def _figures(coll: Collection, diff: DiffStats) -> list[str]:
    figs = []
    dens = np.stack([f["fired"] for f in coll.firing])[0] / max(coll.n_rows, 1)
    live = dens[dens > 0]
    if live.size:
        lo, hi = np.floor(np.log10(live.min())), 0.0
        counts, edges = np.histogram(np.log10(live), bins=40, range=(lo, max(hi, lo + 1)))
        figs.append(svg_histogram(counts, edges, title=f"Firing density ({coll.columns[0]})",
                                  xlabel=f"log10 density ({int((dens == 0).sum())} never fired)", log_y=True,
                                  width=560, height=250))
    if diff.r is not None:
        r = diff.r[np.isfinite(diff.r) & ~diff.dead]
        counts, edges = np.histogram(r, bins=50, range=(0, 1))
        figs.append(svg_histogram(counts, edges, title="Relative decoder norm", log_y=True, width=560, height=250,
                                  xlabel=f"r = |d_{diff.models[1]}| / (|d_{diff.models[0]}| + |d_{diff.models[1]}|)"))
    return figs


def render(inp: ScanInputs, out: str | Path, *, spec: BrowserSpec, diff: DiffStats, vocab: list[str] | None,
           logits: list, logit_models: list[str], info: dict,
           class_lookups: dict | None = None, device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """Collect, select, re-encode, and write the browser for already-opened inputs."""
    started = time.perf_counter()
    coll = collect(inp, spec, class_lookups=class_lookups, device=device, progress=progress)
    t_pass = time.perf_counter() - started
    vocab = vocab if vocab is not None else placeholder_vocab(coll.tokens)
    ex = select_examples(coll, spec)
    window_activations(inp, coll, ex, spec, device=device,
                       batch_rows=spec.batch_rows or max(64, min(4096, (1 << 24) // inp.dictionary.n_latents)))
    t_examples = time.perf_counter() - started - t_pass
    records = Records(coll, ex, diff, logits)
    groups = [{"kind": k, "name": n, "tokens": int(coll.firing[0]["group_rows"][g])}
              for g, (k, n) in enumerate(zip(coll.group_kinds, coll.group_names))]
    meta = {**info, "columns": coll.columns, "models": diff.models, "n_latents": coll.n_latents,
            "n_rows": coll.n_rows, "context_length": coll.context_length, "block_size": spec.block_size,
            "center": spec.context_before, "groups": groups, "logit_models": logit_models,
            "dead_known": diff.dead_known, "spec": spec.__dict__,
            # the Latent Scaling classes that say something (genuine or an artifact): the page's badge
            "nu_badge_classes": list(EXCLUSIVE_CLASSES)}
    summary = [("dictionary", f"{info['dictionary']} ({info['kind']}, {coll.n_latents:,} latents)"),
               ("models", ", ".join(diff.models)), ("hook", info["hook"]),
               ("tokens scanned", f"{coll.n_rows:,} validation tokens of {len(coll.tokens):,} sequences"),
               ("dead latents", f"{int(diff.dead.sum()):,}" if diff.dead_known else "not recorded in training")]
    bs = spec.block_size
    blocks = ((b, records.block(b * bs, (b + 1) * bs)) for b in range(-(-coll.n_latents // bs)))
    title = f"Latents of {info['dictionary']}"
    res = write_browser(out, meta=meta, index=index_table(coll, diff), vocab=[display_token(s) for s in vocab],
                        blocks=blocks, title=title, subtitle=f"{info['kind']} at {info['hook']}",
                        summary=summary, figures=_figures(coll, diff), progress=progress)
    if spec.neuronpedia:
        res["neuronpedia"] = write_neuronpedia(Path(out) / "neuronpedia", records, meta, vocab, spec)
    fired = sum(int(f["fired"].sum()) for f in coll.firing[:1])
    res.update(n_latents=coll.n_latents, rows=coll.n_rows, pass_seconds=round(t_pass, 3),
               mean_l0=round(fired / max(coll.n_rows, 1), 2),
               examples_seconds=round(t_examples, 3),
               seconds=round(time.perf_counter() - started, 3), examples=int(len(ex.value)))
    return res


def build_browser(dict_dir: str | Path, cfg: EvalExperiment, eval_spec: EvalSpec | None, out_dir: str | Path, *,
                  spec: BrowserSpec | None = None, tokenizer=None, device: str | torch.device = "cpu",
                  progress: bool = True, models_cache: dict | None = None,
                  log: Callable[..., None] | None = None) -> dict:
    """Write the latent browser of the dictionary in `dict_dir` to `<out_dir>/browser/`.

    `out_dir` is the dictionary's evaluation folder (its latent_scaling.csv, if any, is shown).
    `tokenizer` defaults to the experiment's; `models_cache` (model name -> LoadedModel) is
    reused and filled, as by the splice evaluation. Returns a summary (also browser/browser.json).
    """
    from pipeline import models as M

    log = log or (lambda *_: None)
    spec = spec or BrowserSpec()
    eval_spec = eval_spec or cfg.eval or EvalSpec()
    dev = M.resolve_device(device)
    trained = open_trained(dict_dir, cfg, device=dev)
    inp = scan_inputs(trained, cfg, log)
    if tokenizer is None:
        tokenizer, _ = E.experiment_tokenizer(cfg)
    table: TokenTable | None = token_table(tokenizer) if tokenizer is not None else None
    lookups = {c.name: table.lookup(c) for c in eval_spec.token_classes} if table is not None else {}
    d = trained.dictionary
    diff = diff_stats(d.W_dec, trained.models, eval_spec, dead_mask(trained, d.n_latents))
    diff.scaling = read_latent_scaling(Path(out_dir) / SCALING_FILE, d.n_latents)
    logits, note = [], "switched off (logit_effects = false)"
    if spec.logit_effects:
        note = ""
        for i, (name, arr) in enumerate(zip(trained.models, trained.arrays)):
            mspec = cfg.model(name)
            if not mspec.has_weights:
                logits.append(None)
                note = f"{name} has no weights in the config"
                log(f"{trained.name}: no logit effects for {name} (no weights)")
                continue
            lm = (models_cache or {}).get(name) or M.load_model(mspec, device=dev)
            if models_cache is not None:
                models_cache[name] = lm
            check_model_identity(name, lm.identity, arr)
            lens = lens_weights(lm.model)
            logits.append(logit_effects(decoder_directions(d.W_dec, i, trained.scales[i]), lens, spec.logit_tokens))
    info = {"title": f"Latents of {trained.name}", "dictionary": trained.name,
            "architecture": trained.meta.get("architecture"),
            "kind": f"{d.n_models}-model crosscoder" if d.n_models > 1 else "SAE", "hook": trained.meta["hook"],
            "tokenset_id": trained.token_set.id, "scales": trained.scales, "logit_note": note}
    out = Path(out_dir) / BROWSER_DIR
    res = render(inp, out, spec=spec, diff=diff, vocab=list(table.strings) if table else None, logits=logits,
                 logit_models=list(trained.models), info=info, class_lookups=lookups, device=dev, progress=progress)
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in res.items()}
    atomic_write_json(out / "browser.json", summary)
    return summary
