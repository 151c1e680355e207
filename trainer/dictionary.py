"""The layout every sparse dictionary shares: SAEs and n-way crosscoders in one set of weights.

An SAE is the one-model case of a crosscoder, so every architecture shares one layout, one
encode/decode, one set of reconstruction metrics and one file format; an architecture
(trainer/architectures.py) only chooses its activation function, its sparsity penalty and its
traits. Keeping the shared part here, apart from the architectures, is what lets a new
architecture be one class in one module.

    W_enc [n_models, d_model, n_latents]    b_enc [n_latents]
    W_dec [n_latents, n_models, d_model]    b_dec [n_models, d_model]

    pre   = einsum(x - b_dec, W_enc, "b n d, n d m -> b m") + b_enc
    f     = activation(pre)                                  # per architecture
    x_hat = einsum(f, W_dec, "b m, m n d -> b n d") + b_dec

Inputs are x [batch, n_models, d_model]. The loss is mse + the architecture's penalty, with sums
over models n and dimensions d, and means over the batch:

    mse        = mean_b sum_{n,d} (x - x_hat)^2
    fvu        = sum_{b,n,d} (x - x_hat)^2 / sum_{b,n,d} (x - mean_b x)^2    (fvu/<i>: model i only)
    l0         = mean_b #{j : f_j > 0}

A crosscoder may partition its latents (trainer/latent_partition.py): designated shared latents
whose decoder rows are one vector tied across models, and latents dedicated to one model whose
decoder rows for the other models are zero. `constrain_` and `remove_parallel_grads_` keep the
partition through training; the masks are buffers, saved with the weights.

A saved dictionary is a folder of two files: the weights as safetensors (WEIGHTS_FILE) and the
recipe as JSON (CONFIG_FILE), so nothing is unpickled on load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.records import atomic_write, atomic_write_text
from trainer import latent_partition as LP
from trainer.sparse_decode import Encoding, SparseCodes, Terms, prefers_sparse

if TYPE_CHECKING:
    from trainer.config import DictionarySpec

WEIGHTS_FILE = "dictionary.safetensors"
CONFIG_FILE = "config.json"
# written beside them by the trainer: int64 `tokens_since_fired` [n_latents], its dead-latent counters
ACTIVITY_FILE = "latent_activity.safetensors"
# what `Dictionary.loss` returns beside its scalar terms (the trainer logs only the scalars)
TENSOR_TERMS = ("f", "counts", "fired")
EPS = 1e-12
_SPARSE_DTYPES = (torch.float32, torch.float64)  # what the sparse CSR products take on every device


class Dictionary(nn.Module):
    """The shared layout, encode/decode, reconstruction metrics, folding and serialisation.

    Subclasses only say how pre-activations become sparse codes (`_activate`) and what the
    sparsity penalty is (`_penalty`), and declare their traits below, which the config checks and
    the trainer read through the registry (`trainer.architectures.ARCHITECTURES`); everything else
    is identical across SAEs and crosscoders.
    """

    # ---------------------------------------------------------------- traits (per architecture)
    architecture: str = ""  # the name configs use: the registry key and config.json's "architecture"
    label: str = ""  # display name in report tables (LaTeX)
    uses_k: bool = False  # reads k (and k_start, the k schedule, aux_k): its spec must set k
    crosscoders: bool = True  # available for several models (False: SAEs only)
    l1_penalty: bool = False  # penalised by l1_coefficient, which l1_warmup_steps ramps up
    resamples_dead: bool = False  # resample_dead_every applies (others revive latents otherwise)

    def __init__(self, spec: DictionarySpec, n_models: int, d_model: int,
                 scales: list[float] | None = None) -> None:
        super().__init__()
        if n_models < 1 or d_model < 1 or spec.n_latents < 1:
            raise ValueError(f"need n_models, d_model, n_latents >= 1, got {n_models}, {d_model}, "
                             f"{spec.n_latents}")
        self.spec = spec
        self.n_models = n_models
        self.d_model = d_model
        self.n_latents = spec.n_latents
        self.scales = [1.0] * n_models if scales is None else [float(s) for s in scales]
        if len(self.scales) != n_models:
            raise ValueError(f"{len(self.scales)} scales for {n_models} models")
        self.folded = False

        # A local generator: building a dictionary never disturbs (or depends on) global RNG state,
        # so lockstep sweeps are reproducible member by member.
        gen = torch.Generator().manual_seed(spec.seed)
        norm = 1.0 if self.unit_norm_decoder else spec.decoder_init_norm
        w_dec = torch.randn(self.n_latents, n_models, d_model, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(EPS) * norm
        # Shared and dedicated latents (trainer/latent_partition.py): saved with the weights as
        # buffers, and only when the spec asks, so other dictionaries' files are unchanged
        self.partition = LP.LatentPartition.from_spec(spec, n_models)
        if self.partition is not None:
            self.register_buffer("decoder_mask", self.partition.decoder_mask())
            self.register_buffer("shared_mask", self.partition.shared_mask())
            LP.init_(w_dec, self.partition, self.decoder_mask)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(rearrange(w_dec, "m n d -> n d m").clone())
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        # Per-model factor on the decoder norms used to rank latents (norm-weighted selection and
        # L1). Folding scales W_dec by 1/s; this buffer takes s, so rankings (and the thresholds
        # compared against them) are the same before and after folding.
        self.register_buffer("decoder_norm_scale", torch.ones(n_models))

    # ---------------------------------------------------------------- what subclasses choose

    @property
    def unit_norm_decoder(self) -> bool:
        """Whether decoder rows are held at unit norm per model (then codes are directly comparable,
        and `constrain_` / `remove_parallel_grads_` keep them there); they start there either way."""
        return False

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        raise NotImplementedError

    def _penalty(self, pre: Tensor, f: Tensor, x: Tensor, x_hat: Tensor, *, k: int | None,
                 l1_coefficient: float | None, dead_mask: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """(weighted penalty added to the mse, unweighted terms to report)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- shared forward path

    def decoder_norms(self) -> Tensor:
        """[n_latents, n_models]: per-model decoder norms, the crosscoder's model-diffing signal."""
        return self.W_dec.norm(dim=-1)

    def _selection_weights(self) -> Tensor:
        """[n_latents]: sum_n ||W_dec[j, n]||, the factor that makes codes comparable across latents.

        Unchanged by a latent partition: a tied shared latent counts its norm in every model, a
        dedicated one in its own model only, which already favours shared latents in top-k
        selection (trainer/latent_partition.py says why no further weight is added)."""
        return (self.decoder_norms() * self.decoder_norm_scale).sum(1)

    def pre_activations(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1:] != (self.n_models, self.d_model):
            raise ValueError(f"expected x of shape [batch, {self.n_models}, {self.d_model}], "
                             f"got {tuple(x.shape)}")
        x = x.to(self.W_enc.dtype)
        # einsum(x - b_dec, W_enc, "b n d, n d m -> b m") + b_enc as one fused addmm over the
        # flattened (n d) axis: the same contraction, without einsum's permute/dispatch per step
        flat = (x - self.b_dec).reshape(x.shape[0], -1)
        return torch.addmm(self.b_enc, flat, self.W_enc.reshape(-1, self.n_latents))

    def encode(self, x: Tensor, *, k: int | None = None) -> Tensor:
        return self._activate(self.pre_activations(x), k)

    def decode(self, f: Tensor) -> Tensor:
        # Outside autograd (evaluation, splicing) codes that are sparse enough are decoded from their
        # nonzero entries (trainer/sparse_decode.py). Not under autograd: a zero code's gradient
        # still matters there (JumpReLU's threshold reads it), and the sparse decode has none.
        if f.dim() == 2 and not (torch.is_grad_enabled() and f.requires_grad) and f.dtype in _SPARSE_DTYPES \
                and prefers_sparse(1.0, self.n_latents, self.d_model, f.device) \
                and prefers_sparse(int(torch.count_nonzero(f)) / max(f.shape[0], 1), self.n_latents,
                                   self.d_model, f.device):
            return SparseCodes.of_dense(f).decode(self.W_dec, self.b_dec)
        # einsum(f, W_dec, "b m, m n d -> b n d") + b_dec, fused the same way
        out = torch.addmm(self.b_dec.reshape(-1), f, self.W_dec.reshape(self.n_latents, -1))
        return out.reshape(f.shape[0], self.n_models, self.d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def _codes(self, pre: Tensor, k: int | None, encoding: Encoding | None = None
               ) -> tuple[Tensor | SparseCodes, Tensor, Tensor | None]:
        """(codes f [batch, latents], float counts [latents] of the tokens each latent fired on,
        the smallest kept ranked code or None).

        The counts serve L0 and the dead-latent counters; selecting architectures override this
        to count from the indices they select instead of another pass over the dense codes. Given
        `encoding` (the training objective passes it), they may return the codes as `SparseCodes`
        drawn from it instead, whose decode and gradients touch the kept codes only.
        """
        f = self._activate(pre, k)
        return f, (f > 0).sum(0, dtype=torch.float32), None

    def _observe_training_batch(self, smallest_kept: Tensor | None) -> None:
        """Called by `loss` in training mode; BatchTopK learns its inference threshold here."""

    def loss(self, x: Tensor, *, k: int | None = None, l1_coefficient: float | None = None,
             dead_mask: Tensor | None = None) -> tuple[Tensor, Terms]:
        """The training objective and its terms (detached scalars, the codes as "f", the number
        of tokens each latent fired on as "counts", and the latents that fired as "fired"). After
        a sparse step "f" is built from the kept codes when first read (`Terms`).

        `k` and `l1_coefficient` are the trainer's scheduled values for this step (k schedule,
        L1 warm-up); they default to the spec's. `dead_mask` [n_latents] marks latents the trainer
        counts as dead, for AuxK.
        """
        x = x.to(self.W_enc.dtype)
        pre = self.pre_activations(x)
        encoding = Encoding(pre.detach(), (x - self.b_dec).detach().reshape(x.shape[0], -1),
                            self.W_enc.reshape(-1, self.n_latents), self.b_enc, self.b_dec)
        f, counts, smallest_kept = self._codes(pre, k, encoding)
        if self.training:
            self._observe_training_batch(smallest_kept)
        sparse = isinstance(f, SparseCodes)
        x_hat = f.decode(self.W_dec, self.b_dec) if sparse else self.decode(f)
        err = (x - x_hat).pow(2)
        mse = err.sum((1, 2)).mean()
        penalty, extra = self._penalty(pre, f, x, x_hat, k=k, l1_coefficient=l1_coefficient,
                                       dead_mask=dead_mask)
        loss = mse + penalty
        with torch.no_grad():
            var = (x - x.mean(0)).pow(2)
            per_model = err.sum((0, 2)) / var.sum((0, 2)).clamp_min(EPS)
            terms = {"loss": loss.detach(), "mse": mse.detach(),
                     "fvu": err.sum() / var.sum().clamp_min(EPS),
                     **{f"fvu/{i}": per_model[i] for i in range(self.n_models)},
                     "l0": counts.sum() / x.shape[0],
                     **{name: v.detach() for name, v in extra.items()},
                     "counts": counts, "fired": counts > 0}
        # sparse codes become the dense "f" only if a caller reads it
        return loss, Terms(terms, f if sparse else f.detach())

    # ---------------------------------------------------------------- the unit-norm constraint

    def constrain_(self) -> None:
        """Call after each optimizer step: puts the decoder back where the dictionary holds it:
        shared latents' rows tied (their mean over models) and dedicated latents' rows zero outside
        their model (trainer/latent_partition.py), then every row (per model) at unit norm when
        the architecture holds them there (`unit_norm_decoder`). Otherwise does nothing."""
        if self.partition is None and not self.unit_norm_decoder:
            return
        self._refuse_if_folded()
        with torch.no_grad():
            if self.partition is not None:
                LP.project_(self.W_dec.data, self.partition.shared, self.partition.end, self.decoder_mask)
            if self.unit_norm_decoder:
                self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS))

    def remove_parallel_grads_(self) -> None:
        """Call before each optimizer step: radial gradient components would only be undone by
        `constrain_`, and Adam would still count them in its moments, so they are dropped first.
        Likewise the decoder gradients leave the latent partition: a shared latent's rows take the
        mean of their gradients over models (identical gradients, identical Adam moments,
        identical steps: the rows stay tied) and a dedicated latent's rows outside its model get
        none (their Adam moments stay zero, and so does the row)."""
        if (self.partition is None and not self.unit_norm_decoder) or self.W_dec.grad is None:
            return
        self._refuse_if_folded()
        with torch.no_grad():
            grad = self.W_dec.grad
            if self.unit_norm_decoder:
                unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(EPS)
                grad.sub_((grad * unit).sum(-1, keepdim=True) * unit)
            if self.partition is not None:
                LP.project_(grad, self.partition.shared, self.partition.end, self.decoder_mask)

    def _refuse_if_folded(self) -> None:
        if self.folded:
            raise RuntimeError("a folded dictionary works on raw activations and is not trained; "
                               "train the unfolded one and fold it afterwards")

    def set_threshold_(self, threshold: Tensor | float | None) -> None:
        """Take an imported dictionary's inference threshold(s); architectures without one ignore it."""

    # ---------------------------------------------------------------- raw activations, files

    def fold_scales(self, scales: list[float] | None = None) -> Dictionary:
        """A copy for RAW activations: trained on x_norm = s_n * x_raw, it reconstructs x_raw.

        W_enc[n] *= s_n and b_dec[n] /= s_n leave the pre-activations unchanged (so every
        threshold still applies); W_dec[:, n] /= s_n maps the reconstruction back to raw units.
        `scales` defaults to the ones the dictionary was built with.
        """
        if self.folded:
            raise ValueError("this dictionary already works on raw activations (folded)")
        s_list = self.scales if scales is None else [float(s) for s in scales]
        if len(s_list) != self.n_models or not all(math.isfinite(s) and s > 0 for s in s_list):
            raise ValueError(f"need {self.n_models} positive finite scales, got {s_list}")
        out = copy.deepcopy(self)
        with torch.no_grad():
            s = torch.tensor(s_list, dtype=self.W_enc.dtype, device=self.W_enc.device)
            out.W_enc.mul_(s[:, None, None])
            out.b_dec.div_(s[:, None])
            out.W_dec.div_(s[None, :, None])
            out.decoder_norm_scale.mul_(s)
        out.scales = [1.0] * self.n_models
        out.folded = True
        return out

    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> None:
        """Weights as safetensors and the recipe as JSON: nothing is unpickled on load."""
        metadata = dict(metadata or {})
        config = {"architecture": self.architecture, "n_models": self.n_models,
                  "d_model": self.d_model, "n_latents": self.n_latents,
                  "spec": dataclasses.asdict(self.spec), "scales": list(self.scales),
                  "folded": self.folded}
        clash = sorted(set(config) & set(metadata))
        if clash:
            raise ValueError(f"metadata may not override {clash}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        # write-then-rename: a checkpoint interrupted mid-write never replaces a good one
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
        atomic_write_text(directory / CONFIG_FILE, json.dumps({**config, **metadata}, indent=2, sort_keys=False))
