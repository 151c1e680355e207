"""Training variants a study compares on relu dictionaries: adaptive sparsity and the merging of
near-duplicate latents, as functions the training loop calls for each member, plus the state a
checkpoint carries so a resumed run continues exactly. (The other two variants need no state of
their own: the L1 schedule is a function of the step, trainer/schedules.py `l1_at`; windowed
resampling reads the trainer's activity counters, trainer/resample.py `resample_candidates`.)

Adaptive sparsity (`adaptive_l1_target_fvu` = t, `adaptive_l1_clamp` = [lo, hi]): the step's L1
coefficient (schedule and warm-up included) is multiplied by

    factor = clamp(t / fvu_ema, lo, hi),    fvu_ema <- d * fvu_ema + (1 - d) * fvu_batch

where fvu_batch is the training batch's fraction of variance unexplained (all models together) and
d = `adaptive_l1_ema_decay`; the first batch sets fvu_ema, and the factor of a step uses the batches
before it (1 at the first step). A reconstruction worse than the target relaxes the penalty, a
better one tightens it: a negative feedback whose fixed point is FVU = t (a factor fvu / t would
feed back positively, pushing a dictionary that reconstructs badly to sparser codes still, and run
to a bound). The target is an FVU rather than an MSE because the FVU is scale-free: the MSE grows
with d_model, with the number of models and with the normalization, so one target would mean
something else at every hook and comparison, while an FVU of 0.1 is 90% variance explained anywhere.

Merging (`merge_every`, `merge_threshold`): after every merge_every-th step, latents whose decoder
rows, the models' slices concatenated, have cosine above the threshold are paired greedily, the most
similar pair first and each latent in at most one pair per merge (a third duplicate merges at the
next one). Of a pair (i < j), i keeps

    W_enc[:, :, i] = mean of the two columns,  b_enc[i] = mean,  W_dec[i] = W_dec[i] + W_dec[j]

and Adam's moments of the pair's mean. The decoder is the sum, not the mean, so the merged latent
reproduces the pair's output: its code relu((pre_i + pre_j) / 2) times d_i + d_j equals
relu(pre_i) d_i + relu(pre_j) d_j wherever the decoders agree and neither pre-activation is
negative (in particular for exact duplicates, which a mean decoder would halve), and its L1 penalty
(code times decoder norm) is the pair's too. Latent j is freed and re-initialized as resampling does
(trainer/resample.py `resample_dead_`: decoder along an input, encoder at 0.2 x the alive norm,
bias 0, Adam's moments zeroed), on inputs of the step's own batch drawn without replacement with
probability proportional to their squared loss under the merged dictionary, seeded by the step.
Activity counters: the kept latent takes the more recent of the pair's, the freed one starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from trainer import resample as R

if TYPE_CHECKING:
    from trainer.config import DictionarySpec

EPS = 1e-12
_BLOCK = 2048  # decoder rows per block of the cosine matrix: [block, n_latents] at a time


@dataclass
class VariantState:
    """What the variants remember between steps, per member; all of it goes into checkpoints."""

    fvu_ema: Tensor  # [] float32: the smoothed training FVU (adaptive sparsity)
    fvu_seen: Tensor  # [] int64: training batches smoothed into it (0: none, factor 1)
    merged_since_log: int = 0  # latents merged away since the last metrics line

    @classmethod
    def new(cls, device: torch.device | str = "cpu") -> VariantState:
        return cls(torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device))

    def tensors(self) -> dict[str, Tensor]:
        """The state as checkpoint tensors (safetensors: no pickle)."""
        return {"fvu_ema": self.fvu_ema.reshape(1), "fvu_seen": self.fvu_seen.reshape(1),
                "merged_since_log": torch.tensor([self.merged_since_log])}

    def load_(self, tensors: dict[str, Tensor]) -> None:
        """Back from `tensors()`; a checkpoint written before the variants existed has none, and
        then the state stays fresh (its runs used no variant)."""
        if not tensors:
            return
        self.fvu_ema.copy_(tensors["fvu_ema"].reshape(()))
        self.fvu_seen.copy_(tensors["fvu_seen"].reshape(()))
        self.merged_since_log = int(tensors["merged_since_log"].reshape(()))


# ------------------------------------------------------------------------------ adaptive sparsity


def adaptive_factor(state: VariantState, spec: DictionarySpec) -> Tensor | float:
    """This step's factor on the L1 coefficient (1.0 without adaptive sparsity); a device tensor
    otherwise, so that no step waits for the GPU to read it."""
    if spec.adaptive_l1_target_fvu is None:
        return 1.0
    lo, hi = spec.adaptive_l1_clamp
    ratio = spec.adaptive_l1_target_fvu / state.fvu_ema.clamp_min(EPS)
    return torch.where(state.fvu_seen > 0, ratio, torch.ones_like(ratio)).clamp(lo, hi)


def scale_knobs(state: VariantState, spec: DictionarySpec, knobs: dict) -> dict:
    """`knobs` (the step's scheduled values) with the L1 coefficient times the adaptive factor."""
    if spec.adaptive_l1_target_fvu is None or "l1_coefficient" not in knobs:
        return knobs
    return {**knobs, "l1_coefficient": knobs["l1_coefficient"] * adaptive_factor(state, spec)}


@torch.no_grad()
def observe_(state: VariantState, spec: DictionarySpec, terms: dict[str, Tensor]) -> None:
    """Smooth this training batch's FVU (`terms` of `Dictionary.loss`) into the state."""
    if spec.adaptive_l1_target_fvu is None:
        return
    fvu = terms["fvu"].detach().to(state.fvu_ema.dtype)
    d = spec.adaptive_l1_ema_decay
    state.fvu_ema.copy_(torch.where(state.fvu_seen > 0, d * state.fvu_ema + (1 - d) * fvu, fvu))
    state.fvu_seen.add_(1)


def log_fields(state: VariantState, spec: DictionarySpec) -> dict:
    """The variants' fields of a metrics line: "l1_factor" (the factor the next step uses) and
    "merged" (latents merged away since the previous line, which this resets)."""
    out: dict = {}
    if spec.adaptive_l1_target_fvu is not None:
        out["l1_factor"] = float(adaptive_factor(state, spec))
    if spec.merge_every:
        out["merged"] = state.merged_since_log
        state.merged_since_log = 0
    return out


# ------------------------------------------------------------------------------ merging


@torch.no_grad()
def duplicate_pairs(w_dec: Tensor, threshold: float) -> list[tuple[int, int]]:
    """Disjoint (kept, freed) pairs, kept < freed, of rows of `w_dec` [n_latents, n_models, d]
    whose cosine over the concatenated models exceeds `threshold`: greedily, the highest cosine
    first (ties: the lower indices first). The cosine matrix is formed a block of rows at a time."""
    unit = w_dec.detach().flatten(1).float()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(EPS)
    n = unit.shape[0]
    found_i, found_j, found_c = [], [], []
    for start in range(0, n, _BLOCK):
        cos = unit[start:start + _BLOCK] @ unit.T  # [block, n]
        rows = torch.arange(start, start + cos.shape[0], device=cos.device)
        upper = torch.arange(n, device=cos.device)[None, :] > rows[:, None]
        i, j = ((cos > threshold) & upper).nonzero(as_tuple=True)  # row-major: (i, j) ascending
        found_i.append(i + start)
        found_j.append(j)
        found_c.append(cos[i, j])
    cos = torch.cat(found_c).cpu()
    order = cos.argsort(descending=True, stable=True)
    pairs, used = [], set()
    for i, j in zip(torch.cat(found_i).cpu()[order].tolist(), torch.cat(found_j).cpu()[order].tolist()):
        if i not in used and j not in used:
            used.update((i, j))
            pairs.append((i, j))
    return pairs


@torch.no_grad()
def merge_pairs_(model, opt: torch.optim.Optimizer, pairs: list[tuple[int, int]], x: Tensor,
                 generator: torch.Generator, tokens_since_fired: Tensor | None = None) -> Tensor:
    """Merge each (kept, freed) pair into its kept latent and re-initialize the freed ones on
    inputs of `x` [batch, n_models, d] (the module docstring has the rule); returns the freed
    latents that were re-initialized (all of them, unless fewer inputs have a loss)."""
    if not pairs:
        return torch.empty(0, dtype=torch.long)
    device = model.W_dec.device
    keep = torch.tensor([p[0] for p in pairs], device=device)
    free = torch.tensor([p[1] for p in pairs], device=device)
    model.W_enc[:, :, keep] = (model.W_enc[:, :, keep] + model.W_enc[:, :, free]) / 2
    model.b_enc[keep] = (model.b_enc[keep] + model.b_enc[free]) / 2
    model.W_dec[keep] = model.W_dec[keep] + model.W_dec[free]
    for p, latent_dim in ((model.W_enc, 2), (model.W_dec, 0), (model.b_enc, 0)):
        p.index_fill_(latent_dim, free, 0.0)  # silent while the merged dictionary's losses are taken
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                m = state[name]
                m.index_copy_(latent_dim, keep, (m.index_select(latent_dim, keep)
                                                 + m.index_select(latent_dim, free)) / 2)
                m.index_fill_(latent_dim, free, 0.0)
    if tokens_since_fired is not None:
        tokens_since_fired[keep] = torch.minimum(tokens_since_fired[keep], tokens_since_fired[free])
        tokens_since_fired[free] = 0
    freed = torch.zeros(model.n_latents, dtype=torch.bool, device=device)
    freed[free] = True
    picker = R.LossWeightedPicker(len(pairs), generator)
    x = x.float()
    picker.offer(x, R.input_losses(model, x))
    return R.resample_dead_(model, opt, freed, picker.picked()[0])


def merge_due(model, opt: torch.optim.Optimizer, spec: DictionarySpec, tokens_since_fired: Tensor,
              state: VariantState, x: Tensor, step: int) -> int:
    """After step `step`, on its batch `x`: merge the member's near-duplicate latents when its
    `merge_every` falls due; returns how many latents were merged away (also counted in `state`
    for the next metrics line)."""
    if not spec.merge_every or (step + 1) % spec.merge_every:
        return 0
    pairs = duplicate_pairs(model.W_dec, spec.merge_threshold)
    generator = torch.Generator().manual_seed(R.derived_seed("merge-pick", spec.seed, step))
    merge_pairs_(model, opt, pairs, x, generator, tokens_since_fired)
    state.merged_since_log += len(pairs)
    return len(pairs)
