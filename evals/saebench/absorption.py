"""First-letter feature absorption (SAEBench `evals/absorption`, after Chanin et al. 2024).

Given the words' activations (evals/saebench/words.py), in the store's normalized units:

1. Ground truth: a logistic probe per letter on the model's activations of the training words
   (one-vs-rest, BCE with pos_weight and SAEBench's weight decay, run to convergence). Its F1 on
   the held-out words says whether the model represents the letter at all.
2. Main latents per letter: an L1-penalised probe on the SAE's codes ranks the latents (largest
   weight first); for k = 1..max_k a balanced L2 probe (C = 1) on the top k latents is scored by
   F1 on held-out words; k grows while the F1 rises by more than f1_jump. The latents of the last
   accepted k are the letter's main (split) latents.
3. Per held-out word of the letter that the probe gets right (score > 0), with p the unit probe
   direction: probe_proj = x . p, and each latent's projection f_i * cos(d_i, p).
   * absorption fraction: 0 if the main latents carry >= probe_proj, or if the (at most 3) other
     latents with cos >= 0.1 and a positive projection carry < 0.4 probe_proj; else 1 if the main
     latents carry <= 0; else min(absorbers, probe_proj - main) / (that + main), clipped to [0, 1].
   * full absorption: every main latent silent (|f| < 1e-8), the top-projecting latent has
     cos >= 0.025, probe_proj >= 0 and that latent carries >= 0.4 probe_proj.
4. Per letter: mean fraction and full-absorption rate over those words, the number of main latents.
   Scores are means (and sample standard deviations) over the letters whose probe F1 exceeds
   min_probe_f1; with fewer than min_letters such letters there is no score (the model lacks the
   feature, as SAEBench refuses too).

SAEBench trains its ground-truth probe for 50 Adam epochs and samples fresh ICL examples for the
absorption prompts; here the probe is the converged optimum of the same loss and the held-out
activations are reused, so a run is a function of the seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor

from evals.saebench.config import LETTERS, AbsorptionSpec
from evals.saebench.logistic import balanced_weights, f1_scores, fit_l1_probe, fit_logistic, logits, pos_weighted
from evals.saebench.view import SaeView
from evals.saebench.words import WordData

ABSORBER_COS = 0.1  # absorption fraction: cosine with the probe a potential absorber needs
FULL_ABSORPTION_COS = 0.025  # full absorption: cosine with the probe of the top-projecting latent
PROJECTION_SHARE = 0.4  # both: share of the probe projection the absorbers must carry
MAX_ABSORBERS = 3
SILENT = 1e-8  # |f| below this: the latent did not fire


@dataclass
class LetterProbe:
    """The ground-truth probe: one direction per letter, and its held-out F1."""

    weight: Tensor  # [26, d]
    bias: Tensor  # [26]
    f1: Tensor  # [26]


def one_hot(letters: Tensor) -> Tensor:
    return torch.nn.functional.one_hot(letters, len(LETTERS)).float()


def fit_letter_probe(data: WordData, spec: AbsorptionSpec, device: str | torch.device = "cpu") -> LetterProbe:
    """Step 1, shared by every SAE on the same model and hook (fitted on `device`: a GPU's for
    a large vocabulary and d_model)."""
    _, y_train, x_train = data.split(test=False)
    _, y_test, x_test = data.split(test=True)
    x_train, x_test = x_train.to(device), x_test.to(device)
    y = one_hot(y_train).to(device)
    weight, bias = fit_logistic(x_train, y, sample_weight=pos_weighted(y), l2=spec.probe_l2 * len(y))
    f1 = f1_scores(one_hot(y_test).to(device).bool(), logits(x_test.to(weight), weight, bias) > 0)
    return LetterProbe(weight.float(), bias.float(), f1.float().cpu())


def main_latents(view: SaeView, data: WordData, spec: AbsorptionSpec, seed: int
                 ) -> tuple[list[list[int]], Tensor]:
    """Step 2: (main latents per letter, k-sparse F1 [max_k, 26])."""
    _, y_train, x_train = data.split(test=False)
    _, y_test, x_test = data.split(test=True)
    x_train, x_test = x_train.to(view.device), x_test.to(view.device)
    train_hot, test_hot = one_hot(y_train).to(view.device), one_hot(y_test).to(view.device)
    ranking = fit_l1_probe(x_train, train_hot, view.encode_fn, view.n_latents, l1=spec.ksparse_l1,
                           epochs=spec.ksparse_epochs, seed=seed)
    max_k = min(spec.max_k, view.n_latents)
    top = ranking.topk(max_k, dim=1).indices  # [26, max_k], by weight (not |weight|): latents that predict the letter
    used, column = top.unique(return_inverse=True)  # codes of the ranked latents only
    f_train, f_test = view.codes(x_train, latents=used), view.codes(x_test, latents=used)
    f1 = torch.zeros(max_k, len(LETTERS), dtype=torch.float64)
    for k in range(1, max_k + 1):
        cols = column[:, :k]  # [26, k]
        xs_train = f_train[:, cols].permute(1, 0, 2)  # [26, n, k]
        weight, bias = fit_logistic(xs_train, train_hot, sample_weight=balanced_weights(train_hot), l2=1.0)
        scores = logits(f_test[:, cols].permute(1, 0, 2).to(weight), weight, bias)
        f1[k - 1] = f1_scores(test_hot.bool(), scores > 0).cpu()
    mains = []
    for letter in range(len(LETTERS)):
        best, chosen = -math.inf, 1
        for k in range(1, max_k + 1):
            if f1[k - 1, letter] > best + spec.f1_jump:
                best, chosen = float(f1[k - 1, letter]), k
            else:
                break
        mains.append(top[letter, :chosen].tolist())
    return mains, f1


def absorption_per_word(x: Tensor, f: Tensor, direction: Tensor, cos: Tensor, main: list[int]
                        ) -> tuple[Tensor, Tensor]:
    """Step 3 for words x [n, d] with codes f [n, m]: (absorption fraction [n], full absorption [n] bool).
    `direction` is the unit probe direction, `cos` [m] each latent's decoder cosine with it."""
    probe_proj = x.float() @ direction.float()
    proj = f.float() * cos[None, :].float()
    main_idx = torch.as_tensor(main, dtype=torch.long, device=f.device)
    main_proj = proj[:, main_idx].sum(1)
    candidate = (cos >= ABSORBER_COS)[None, :] & (proj > 0)
    candidate[:, main_idx] = False
    top = torch.where(candidate, proj, torch.full_like(proj, -math.inf)).topk(min(MAX_ABSORBERS, proj.shape[1]), 1).values
    absorbers = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(1)
    unaccounted = torch.minimum(absorbers, probe_proj - main_proj)
    partial = (unaccounted / (unaccounted + main_proj)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones_like(partial), partial)
    fraction = torch.where((main_proj >= probe_proj) | (absorbers / probe_proj < PROJECTION_SHARE),
                           torch.zeros_like(fraction), fraction)
    top_proj, top_latent = proj.max(1)
    full = ((f[:, main_idx].abs() < SILENT).all(1) & (cos[top_latent] >= FULL_ABSORPTION_COS)
            & (probe_proj >= 0) & (top_proj / probe_proj >= PROJECTION_SHARE))
    return fraction, full


def evaluate_absorption(view: SaeView, data: WordData, probe: LetterProbe, spec: AbsorptionSpec, *,
                        seed: int) -> dict:
    """Steps 2-4: the scores and the per-letter detail, as a JSON-able dict."""
    mains, ksparse_f1 = main_latents(view, data, spec, seed)
    _, y_test, x_test = data.split(test=True)
    scores = logits(x_test.to(probe.weight), probe.weight, probe.bias)  # [n, 26]
    unit = probe.weight / probe.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    decoder = view.decoder.float()
    cos = (decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ unit.to(decoder).T  # [m, 26]
    letters = []
    for li, letter in enumerate(LETTERS):
        right = (y_test == li) & (scores[:, li] > 0).cpu()
        x = x_test[right]
        n_tp = int(right.sum())
        fraction, full = (absorption_per_word(x.to(view.device), view.codes(x.to(view.device)),
                                              unit[li].to(view.device), cos[:, li], mains[li])
                          if n_tp else (torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
        probe_f1 = float(probe.f1[li])
        letters.append({
            "first_letter": letter, "probe_f1": probe_f1,
            "scored": bool(probe_f1 > spec.min_probe_f1 and n_tp > 0),
            "num_probe_true_positives": n_tp,
            "mean_absorption_fraction": float(fraction.sum()) / n_tp if n_tp else None,
            "full_absorption_rate": float(full.sum()) / n_tp if n_tp else None,
            "num_full_absorption": int(full.sum()),
            "num_split_features": len(mains[li]),
            "split_latents": mains[li],
            "ksparse_f1": [float(v) for v in ksparse_f1[:, li]],
        })
    return {**summarize(letters, spec), "letters": letters, "n_words_train": int((~data.test).sum()),
            "n_words_test": int(data.test.sum())}


def summarize(letters: list[dict], spec: AbsorptionSpec) -> dict:
    """Step 4's means over the scored letters (None, with the reason, when too few are)."""
    scored = [r for r in letters if r["scored"]]
    out = {"n_letters_scored": len(scored), "letters_scored": "".join(r["first_letter"] for r in scored)}
    keys = {"absorption_fraction_score": "mean_absorption_fraction", "full_absorption_score": "full_absorption_rate",
            "num_split_features": "num_split_features"}
    if len(scored) < spec.min_letters:
        out["note"] = (f"only {len(scored)} letter(s) have a ground-truth probe F1 above {spec.min_probe_f1} "
                       f"(min_letters {spec.min_letters}): the model does not represent first letters "
                       "well enough at this hook for an absorption score")
        return {**out, **{f"mean_{k}": None for k in keys}, **{f"std_dev_{k}": None for k in keys}}
    for name, key in keys.items():
        values = [float(r[key]) for r in scored]
        out[f"mean_{name}"] = statistics.fmean(values)
        out[f"std_dev_{name}"] = statistics.stdev(values) if len(values) > 1 else None
    return out
