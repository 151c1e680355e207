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
    ce_diff_stderr     = the standard error of ce_diff over the evaluated sequences: the sample
                         standard deviation of the per-sequence ce_diffs / sqrt(sequences) (the
                         sequences, not the tokens, are the independent units: a sequence's
                         tokens share their context). On a CPU the splice covers few sequences;
                         this says how far the figure can move.
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
                         against the stored one. bfloat16 storage alone gives 0.2-0.4%, another
                         compute dtype (bfloat16 vs float32) about 1%; adjacent fine-tuning
                         checkpoints differ by more. Above STORE_MISMATCH_LIMIT (5%) on the first
                         batch the store does not hold these models' activations: an error

Joint over the models: explained_variance (sums over all models) and mse (sum over models and
dimensions, as the trainer's mse). Dictionary, with f the codes (joint for a crosscoder):

    l0                 = mean over tokens of #{j : f_j > 0}
    l1                 = mean over tokens of sum_j |f_j|   (SAEBench / SAELens `l1`)
    frac_alive         = fraction of latents with f_j > 0 on at least one evaluated token
                         (SAEBench `frac_alive`)
    silent_on_eval     = latents with f_j = 0 on every evaluated token (= n_latents * (1 -
                         frac_alive)), measured on silent_on_eval_tokens tokens: a few thousand
                         tokens leave rare latents silent, so this is not the training count
    dead_latents       = latents dead by the training definition: silent for dead_after_tokens
                         training tokens when training ended (trainer.trained); null, with
                         dead_latents_definition "unknown: ...", when the folder does not record it
    n_latents

Every mean is a ratio of sums over all batches, never a mean of batch means.

This module drives the evaluation (`evaluate_dictionary`) and writes `splice.json`; the variants'
edits, forwards and losses are `evals.variants`, the reconstruction statistics
`evals.reconstruction`. Their names are imported here as well (`from evals import splice as SP`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from evals.config import EvalExperiment as ExperimentConfig
from evals.reconstruction import ReconstructionStats, explained_variance
from evals.variants import (
    VARIANTS,
    Splice,
    SpliceError,
    VariantLosses,
    logits_fn,
    spliced_final_hidden,
    variant_losses,
)
from pipeline import models as M
from pipeline import store as S
from pipeline.records import atomic_write_text, strict_json
from trainer.dictionaries import Dictionary
from trainer.trained import TrainedDictionary, check_model_identity, open_trained

__all__ = [
    "SPLICE_FILE", "STORE_MISMATCH_LIMIT", "VARIANTS", "ReconstructionStats", "Splice", "SpliceError",
    "VariantLosses", "evaluate_dictionary", "explained_variance", "logits_fn", "spliced_final_hidden",
    "variant_losses",
]

SPLICE_FILE = "splice.json"
STORE_MISMATCH_LIMIT = 0.05  # store_rel_error above this: the stored rows are not these activations
_CODE_ELEMENTS = 1 << 26  # dictionary codes materialised at once (256 MiB)


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
def _encode_decode(dictionary: Dictionary, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_hat [N, n, d], active-count sum (0-d), sum of |f| (0-d, float64), fired mask [n_latents];
    codes in token chunks."""
    step = max(1, _CODE_ELEMENTS // dictionary.n_latents)
    x_hat, active, fired = [], torch.zeros((), dtype=torch.long, device=x.device), None
    abs_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for lo in range(0, x.shape[0], step):
        f = dictionary.encode(x[lo:lo + step])
        x_hat.append(dictionary.decode(f))
        on = f > 0
        active += on.sum()
        abs_sum += f.abs().sum(dtype=torch.float64)
        fired = on.any(0) if fired is None else fired | on.any(0)
    return torch.cat(x_hat), active, abs_sum, fired


def dead_definition(trained: TrainedDictionary) -> str:
    """What splice.json's `dead_latents` counts, or why it is unknown."""
    if trained.dead_latents is None:
        return ("unknown: the dictionary folder records no training activity (an older run or an "
                "imported dictionary); silent_on_eval counts latents silent on the evaluated tokens")
    return (f"silent for >= {trained.dead_after_tokens} training tokens when training ended "
            "(train.dead_after_tokens)")


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _stderr(values: Tensor) -> float:
    """Standard error of the mean of `values` (NaN for fewer than 2)."""
    n = values.numel()
    return float(values.std() / math.sqrt(n)) if n > 1 else math.nan


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
        seq_diffs: list[list[Tensor]] = [[] for _ in names]  # per model, per batch: [b] ce_diffs
        n_pred = 0
        store_err = [[0.0, 0.0] for _ in names]
        active_sum, abs_sum = 0.0, 0.0
        fired = torch.zeros(dictionary.n_latents, dtype=torch.bool, device=target)

        batches = range(seqs.start, seqs.stop, batch_size)
        bar = tqdm(batches, unit="batch", disable=not progress, dynamic_ncols=True,
                   desc=f"splice {meta.get('name', dict_dir.name)}")
        for i_batch, lo in enumerate(bar):
            hi = min(lo + batch_size, seqs.stop)
            b = hi - lo
            ids = torch.from_numpy(ts.tokens[lo:hi]).long()
            x = _read_batch(arrays, lo * ctx, hi * ctx).view(b, ctx, len(names), -1)[:, 1:]
            x = x.reshape(b * (ctx - 1), len(names), -1).to(target)
            x_hat, active, batch_abs, batch_fired = _encode_decode(dictionary, x)
            active_sum += float(active)
            abs_sum += float(batch_abs)
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
                seq_diffs[i].append((vl.nll_per_sequence[1] - vl.nll_per_sequence[0]) / (ctx - 2))
                if i_batch == 0 and store_err[i][1] > 0:
                    rel = math.sqrt(store_err[i][0] / store_err[i][1])
                    if not rel <= STORE_MISMATCH_LIMIT:
                        raise SpliceError(
                            f"model {name!r}: its live activations at {hook.label} differ from the "
                            f"stored ones by {rel:.1%} of their norm, above the {STORE_MISMATCH_LIMIT:.0%} "
                            f"that storage rounding or another compute dtype can explain "
                            f"({arrays[i].path}): the store does not hold this model's activations of "
                            "these tokens; check that the config's model (path, repo, revision) is the "
                            "checkpoint that was cached, or cache this one")
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
            "ce_diff": spliced - clean, "ce_diff_stderr": _stderr(torch.cat(seq_diffs[i])),
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
            "l1": abs_sum / n_tokens,
            "frac_alive": float(fired.sum()) / dictionary.n_latents,
            "dead_latents": trained.dead_latents,
            "dead_latents_definition": dead_definition(trained),
            "silent_on_eval": int((~fired).sum()),
            "silent_on_eval_tokens": n_tokens,
            "n_latents": dictionary.n_latents,
            "n_tokens": n_tokens,
            "n_predictions": n_pred,
        },
        "ce_diff": {name: results[name]["ce_diff"] for name in names},
        "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else math.nan,
    }
    report = strict_json(report)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / SPLICE_FILE, json.dumps(report, indent=1))
    return report
