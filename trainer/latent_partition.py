"""Designated shared latents and dedicated latents: a crosscoder's latents partitioned by model.

Crosscoder latents that look specific to one model are often artifacts: with the decoder-norm-
weighted L1, a latent that reconstructs both models pays for both decoder norms, so the optimizer
saves penalty by splitting shared structure into latents that decode into one model each, or by
shrinking one model's decoder to zero. Two remedies (Anthropic's Feb 2025 crosscoder update, and
dedicated-feature crosscoders) are a partition of the latents, in index order:

    [0, S)                          designated shared: one decoder vector used for every model
    [S, S + D_0)                    dedicated to model 0: decoder rows of the other models are 0
    [S + D_0, S + D_0 + D_1)        dedicated to model 1, and so on in train.models order
    [S + sum D, n_latents)          free, as in an ordinary crosscoder

S is `shared_latents` (a count, not a fraction: sweeps over n_latents then keep S exact) and D is
`dedicated_latents`, one count per model of train.models. Only decoders are restricted: encoders
read every model, as for any latent, so a dedicated latent may be detected from any model's
activations but writes into its own model only.

How the partition is kept, with Adam, through training (Dictionary.remove_parallel_grads_ before
the step, Dictionary.constrain_ after it):

- tied rows: the shared rows start identical (one random vector copied to every model) and their
  gradients are replaced by the mean over models before each step. The rows' gradients are then
  identical; Adam's moments start at zero and are updated elementwise, so they stay identical and
  so do the updates (gradient clipping scales every gradient by one factor and keeps them equal).
  After the step the rows are set to their mean anyway, which is a no-op up to rounding unless
  something else (a resampling, a loaded state) moved them apart. The mean, not the sum, of the
  per-model gradients: Adam's step does not depend on the gradient's scale, and the mean keeps a
  tied row's gradient on the scale of an untied one for gradient clipping. Storing the shared rows
  once (a parametrization) would give the same steps but a second decoder layout that every
  reader of W_dec (folding, exports, evaluations) would have to know.
- dedicated rows: their gradients outside the latent's model are zeroed before the step, so
  Adam's moments there stay zero and the update is exactly zero; the rows are also multiplied by
  the mask after the step, so they stay exactly zero.

The reduced penalty of shared latents (ReLU, the decoder-norm-weighted L1 only): a shared
latent's L1 term is multiplied by `shared_penalty_factor` (default 0.15, in the 0.1-0.2 range
Anthropic used). TopK and BatchTopK have no such penalty to reduce: every selected latent costs
one of the k slots whatever its decoder, and their ranking weight (the sum of decoder norms)
already favours a latent decoding into several models over one decoding into one; so for them the
partition ties and masks decoders and nothing else, and the factor is refused by the config.
A dedicated latent's L1 weight is its one nonzero decoder norm, as for any latent.

The partition is saved with the weights: `decoder_mask` [n_latents, n_models] (1 where a decoder
row may be nonzero) and `shared_mask` [n_latents] (1 for designated shared latents) are buffers
of the dictionary, present only when the spec partitions its latents (dictionaries without one
keep their state dict unchanged). Folding (Dictionary.fold_scales) divides model n's decoder by
its scale s_n, so a folded shared latent's rows are the tied vector over s_n, one per model: the
tie holds in the normalized units the dictionary was trained in, which is all that needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.config import DictionarySpec

# Anthropic's crosscoder update reduced the shared latents' L1 to 0.1-0.2 of the others'
DEFAULT_SHARED_PENALTY_FACTOR = 0.15


@dataclass(frozen=True)
class LatentPartition:
    """Which latents are tied across models and which decode into one model, as index ranges."""

    n_latents: int
    n_models: int
    shared: int  # latents [0, shared) are designated shared
    dedicated: tuple[int, ...]  # per model: counts of the dedicated blocks after the shared ones

    @classmethod
    def from_spec(cls, spec: DictionarySpec, n_models: int) -> LatentPartition | None:
        """The spec's partition, or None when it has neither shared nor dedicated latents.

        Refuses what cannot be built (the config checks say the same with the key and the fix);
        dictionaries are also built outside configs (tests, imports).
        """
        shared, dedicated = spec.shared_latents, tuple(spec.dedicated_latents)
        if shared == 0 and not any(dedicated):
            return None
        if n_models < 2:
            raise ValueError("shared_latents and dedicated_latents partition a crosscoder's latents across "
                             "models; an SAE (one model) has no such partition: remove them")
        if shared < 0 or any(c < 0 for c in dedicated):
            raise ValueError(f"shared_latents ({shared}) and dedicated_latents ({list(dedicated)}) are counts "
                             "of latents: use values >= 0")
        if dedicated and len(dedicated) != n_models:
            raise ValueError(f"dedicated_latents has {len(dedicated)} counts for {n_models} models: give one "
                             "count per model, in train.models order")
        dedicated = dedicated or (0,) * n_models
        if shared + sum(dedicated) > spec.n_latents:
            raise ValueError(f"shared_latents + sum(dedicated_latents) = {shared + sum(dedicated)} exceeds "
                             f"n_latents ({spec.n_latents})")
        return cls(spec.n_latents, n_models, shared, dedicated)

    @property
    def end(self) -> int:
        """One past the last partitioned latent: [end, n_latents) are free."""
        return self.shared + sum(self.dedicated)

    def dedicated_range(self, model: int) -> range:
        start = self.shared + sum(self.dedicated[:model])
        return range(start, start + self.dedicated[model])

    def decoder_mask(self) -> Tensor:
        """[n_latents, n_models] float: 1 where a decoder row may be nonzero, 0 where it stays 0."""
        mask = torch.ones(self.n_latents, self.n_models)
        for model in range(self.n_models):
            rows = self.dedicated_range(model)
            mask[rows.start:rows.stop] = 0.0
            mask[rows.start:rows.stop, model] = 1.0
        return mask

    def shared_mask(self) -> Tensor:
        """[n_latents] float: 1 for the designated shared latents."""
        mask = torch.zeros(self.n_latents)
        mask[:self.shared] = 1.0
        return mask


def shared_penalty_factor(spec: DictionarySpec) -> float:
    """The factor on a shared latent's L1 term: the spec's, by default DEFAULT_SHARED_PENALTY_FACTOR."""
    factor = spec.shared_penalty_factor
    return DEFAULT_SHARED_PENALTY_FACTOR if factor is None else float(factor)


def l1_latent_factor(partition: LatentPartition, factor: float) -> Tensor:
    """[n_latents]: the multiplier on each latent's L1 term (`factor` on shared latents, else 1)."""
    return 1.0 - (1.0 - factor) * partition.shared_mask()


@torch.no_grad()
def project_(rows: Tensor, shared: int, end: int, decoder_mask: Tensor) -> None:
    """Put decoder rows (or their gradients) [n_latents, n_models, d] onto the partition, in place:
    the shared rows [0, shared) become their mean over models, and the dedicated rows
    [shared, end) are zeroed outside their model (rows past `end` are free and untouched)."""
    if shared:
        rows[:shared] = rows[:shared].mean(1, keepdim=True)
    if end > shared:
        rows[shared:end].mul_(decoder_mask[shared:end, :, None].to(rows.dtype))


def init_(w_dec: Tensor, partition: LatentPartition, decoder_mask: Tensor) -> None:
    """Give a freshly drawn decoder the partition: each shared latent takes its model-0 vector for
    every model (at the same init norm), dedicated rows outside their model become 0."""
    with torch.no_grad():
        w_dec[:partition.shared] = w_dec[:partition.shared, :1].clone()
        project_(w_dec, 0, partition.end, decoder_mask)
