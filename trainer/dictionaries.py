"""Sparse dictionaries: SAEs and n-way crosscoders in one weight layout.

An SAE is the one-model case of a crosscoder, so every architecture shares one layout and one
encode/decode; an architecture only chooses its activation function and its sparsity penalty:

    W_enc [n_models, d_model, n_latents]    b_enc [n_latents]
    W_dec [n_latents, n_models, d_model]    b_dec [n_models, d_model]

    pre   = einsum(x - b_dec, W_enc, "b n d, n d m -> b m") + b_enc
    f     = activation(pre)                                  # per architecture
    x_hat = einsum(f, W_dec, "b m, m n d -> b n d") + b_dec

Inputs are x [batch, n_models, d_model]. The loss terms, with sums over models n and dimensions
d, and means over the batch:

    mse        = mean_b sum_{n,d} (x - x_hat)^2
    fvu        = sum_{b,n,d} (x - x_hat)^2 / sum_{b,n,d} (x - mean_b x)^2    (fvu/<i>: model i only)
    l0         = mean_b #{j : f_j > 0}
    relu       loss = mse + l1_coefficient * l1,  l1 = mean_b sum_j f_j * sum_n ||W_dec[j, n]||
    topk       loss = mse + aux_coefficient * aux
    batchtopk  loss = mse + aux_coefficient * aux
    jumprelu   loss = mse + l0_coefficient * l0_penalty,  l0_penalty = mean_b sum_j H(pre_j - theta_j)

The AuxK term (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section A.2) models
the main reconstruction's error e = x - x_hat (a detached target) with the `aux_k` largest
pre-activations among the dead latents, decoded without b_dec, normalised by the variance of e:

    aux = sum_{b,n,d} (e - e_hat)^2 / sum_{b,n,d} (e - mean_b e)^2,   e_hat = einsum(z, W_dec)

where z keeps the top aux_k (default 2*k, capped at the number of dead latents) of relu(pre) over
the dead latents per token. It is zero when no latent is dead (or aux_k = 0). The normalisation
makes aux_coefficient (Gao et al.: 1/32) independent of the activation scale.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainer.config import DictionarySpec

WEIGHTS_FILE = "dictionary.safetensors"
# what `Dictionary.loss` returns beside its scalar terms (the trainer logs only the scalars)
TENSOR_TERMS = ("f", "counts", "fired")
CONFIG_FILE = "config.json"
_EPS = 1e-12


class Dictionary(nn.Module):
    """The shared layout, encode/decode, reconstruction metrics, folding and serialisation.

    Subclasses only say how pre-activations become sparse codes (`_activate`) and what the
    sparsity penalty is (`_penalty`); everything else is identical across SAEs and crosscoders.
    """

    architecture: str = ""

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
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS) * norm
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
        """Whether decoder rows are held at unit norm (then codes are directly comparable)."""
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
        """[n_latents]: sum_n ||W_dec[j, n]||, the factor that makes codes comparable across latents."""
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
        # einsum(f, W_dec, "b m, m n d -> b n d") + b_dec, fused the same way
        out = torch.addmm(self.b_dec.reshape(-1), f, self.W_dec.reshape(self.n_latents, -1))
        return out.reshape(f.shape[0], self.n_models, self.d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    def _codes(self, pre: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(codes f [batch, latents], float counts [latents] of the tokens each latent fired on,
        the smallest kept ranked code or None).

        The counts serve L0 and the dead-latent counters; selecting architectures override this
        to count from the indices they select instead of another pass over the dense codes.
        """
        f = self._activate(pre, k)
        return f, (f > 0).sum(0, dtype=torch.float32), None

    def _observe_training_batch(self, smallest_kept: Tensor | None) -> None:
        """Called by `loss` in training mode; BatchTopK learns its inference threshold here."""

    def loss(self, x: Tensor, *, k: int | None = None, l1_coefficient: float | None = None,
             dead_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective and its terms (detached scalars, the codes as "f", the number
        of tokens each latent fired on as "counts", and the latents that fired as "fired").

        `k` and `l1_coefficient` are the trainer's scheduled values for this step (k schedule,
        L1 warm-up); they default to the spec's. `dead_mask` [n_latents] marks latents the trainer
        counts as dead, for AuxK.
        """
        x = x.to(self.W_enc.dtype)
        pre = self.pre_activations(x)
        f, counts, smallest_kept = self._codes(pre, k)
        if self.training:
            self._observe_training_batch(smallest_kept)
        x_hat = self.decode(f)
        err = (x - x_hat).pow(2)
        mse = err.sum((1, 2)).mean()
        penalty, extra = self._penalty(pre, f, x, x_hat, k=k, l1_coefficient=l1_coefficient,
                                       dead_mask=dead_mask)
        loss = mse + penalty
        with torch.no_grad():
            var = (x - x.mean(0)).pow(2)
            per_model = err.sum((0, 2)) / var.sum((0, 2)).clamp_min(_EPS)
            terms = {"loss": loss.detach(), "mse": mse.detach(),
                     "fvu": err.sum() / var.sum().clamp_min(_EPS),
                     **{f"fvu/{i}": per_model[i] for i in range(self.n_models)},
                     "l0": counts.sum() / x.shape[0],
                     **{name: v.detach() for name, v in extra.items()},
                     "counts": counts, "fired": counts > 0, "f": f.detach()}
        return loss, terms

    # ---------------------------------------------------------------- constraints (default: none)

    def constrain_(self) -> None:
        """Call after each optimizer step; restores the decoder constraint, if any."""

    def remove_parallel_grads_(self) -> None:
        """Call before each optimizer step; keeps the step tangent to the constraint, if any."""

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
        _atomic(directory / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
        text = json.dumps({**config, **metadata}, indent=2, sort_keys=False)
        _atomic(directory / CONFIG_FILE, lambda p: p.write_text(text, encoding="utf-8"))


class ReLUDictionary(Dictionary):
    """ReLU codes with the decoder-norm-weighted L1 (Anthropic's crosscoder penalty).

    Weighting by decoder norm stops the optimiser from dodging the L1 by shrinking codes and
    growing decoder rows, so no norm constraint is needed.
    """

    architecture = "relu"

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        return torch.relu(pre)

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        coef = self.spec.l1_coefficient if l1_coefficient is None else l1_coefficient
        # mean_b sum_j f_bj w_j, as (mean_b f_b) . w: no [batch, latents] temporary either way
        l1 = f.mean(0) @ self._selection_weights()
        return coef * l1, {"l1": l1}


class TopKDictionary(Dictionary):
    """Exactly the k largest codes per token (Gao et al. 2024), with AuxK against dead latents.

    Latents are ranked by f_j * sum_n ||W_dec[j, n]||: for an SAE the decoder rows are held at unit
    norm and this is f_j; a crosscoder has no constraint, so the weighting is what makes codes of
    differently-scaled latents comparable.
    """

    architecture = "topk"

    @property
    def unit_norm_decoder(self) -> bool:
        return self.n_models == 1

    def _k(self, k: int | None) -> int:
        k = self.spec.k if k is None else k
        if k is None or k < 1:
            raise ValueError(f"{self.architecture} needs k >= 1 (spec.k or the k passed in), got {k}")
        return min(k, self.n_latents)

    def _ranked(self, f: Tensor) -> Tensor:
        return f if self.unit_norm_decoder else f * self._selection_weights().detach()

    def _select(self, pre: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
        """(flat indices into pre, their ranked values) of the codes this architecture keeps."""
        top = self._ranked(pre).topk(self._k(k), dim=1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device)[:, None] * pre.shape[1]
        return (top.indices + rows).flatten(), top.values.flatten()

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        return self._codes(pre, k)[0]

    def _codes(self, pre: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        # ranking pre-activations (weights > 0) picks the same latents as ranking relu(pre), so
        # the relu only touches the chosen values, and a code is active exactly where its ranked
        # value is positive: L0, the counters and the smallest kept code come from the selection
        # (batch * k values), not from more passes over the dense [batch, latents] codes
        idx, ranked = self._select(pre, k)
        flat = pre.flatten()
        f = torch.zeros_like(flat).scatter_(0, idx, torch.relu(flat.gather(0, idx))).view_as(pre)
        active = ranked > 0
        counts = torch.zeros(self.n_latents, dtype=torch.float32, device=pre.device)
        counts.index_add_(0, idx % self.n_latents, active.to(torch.float32))
        smallest = torch.where(active, ranked, math.inf).min()
        return f, counts, smallest

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        aux = self._aux_loss(pre, x, x_hat, dead_mask)
        return self.spec.aux_coefficient * aux, {"aux": aux}

    def _aux_loss(self, pre: Tensor, x: Tensor, x_hat: Tensor, dead_mask: Tensor | None) -> Tensor:
        zero = pre.new_zeros(())
        aux_k = 2 * self._k(None) if self.spec.aux_k is None else self.spec.aux_k
        if dead_mask is None or aux_k == 0:
            return zero
        # the dead latents' columns only: the cost scales with how many are dead, not with the
        # dictionary (the index list is one host sync, as counting them would be)
        dead = dead_mask.to(device=pre.device, dtype=torch.bool).nonzero().squeeze(1)
        if dead.numel() == 0:
            return zero
        e = (x - x_hat).detach()
        everyone = dead.numel() == self.n_latents  # then no column copies are needed
        dead_pre = torch.relu(pre if everyone else pre.index_select(1, dead))
        w_dec = self.W_dec if everyone else self.W_dec.index_select(0, dead)
        top = dead_pre.topk(min(aux_k, dead.numel()), dim=1, sorted=False)
        z = torch.zeros_like(dead_pre).scatter_(1, top.indices, top.values)
        e_hat = (z @ w_dec.reshape(dead.numel(), -1)).view_as(e)
        return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(_EPS)

    def constrain_(self) -> None:
        if not self.unit_norm_decoder:
            return
        self._refuse_if_folded()
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS))

    def remove_parallel_grads_(self) -> None:
        """Radial gradient components would only be undone by `constrain_`; drop them first."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        self._refuse_if_folded()
        with torch.no_grad():
            unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(_EPS)
            grad = self.W_dec.grad
            grad.sub_((grad * unit).sum(-1, keepdim=True) * unit)

    def _refuse_if_folded(self) -> None:
        if self.folded:
            raise RuntimeError("a folded dictionary works on raw activations and is not trained; "
                               "train the unfolded one and fold it afterwards")


class BatchTopKDictionary(TopKDictionary):
    """The batch*k largest codes over a training batch (Bussmann et al. 2024): k on average.

    Inference must not depend on the batch, so training also estimates a global threshold: after
    each training `loss` call, the smallest kept (norm-weighted) code of that batch is folded into
    an exponential moving average (factor 0.99; the first batch sets it). In eval mode a code is
    kept when its norm-weighted value exceeds `threshold`. A negative threshold means "not yet
    estimated"; eval then keeps every positive code.
    """

    architecture = "batchtopk"
    threshold_momentum = 0.99

    def __init__(self, spec: DictionarySpec, n_models: int, d_model: int,
                 scales: list[float] | None = None) -> None:
        super().__init__(spec, n_models, d_model, scales)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        if not self.training:
            f = torch.relu(pre)
            return f * (self._ranked(f) > self.threshold)
        return super()._activate(pre, k)

    def _select(self, pre: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
        top = self._ranked(pre).flatten().topk(pre.shape[0] * self._k(k), sorted=False)
        return top.indices, top.values

    def _codes(self, pre: Tensor, k: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self.training:
            return Dictionary._codes(self, pre, k)
        return super()._codes(pre, k)

    @torch.no_grad()
    def _observe_training_batch(self, smallest_kept: Tensor | None) -> None:
        # tensor ops only: no host sync on the training hot path
        if smallest_kept is None:
            return
        old = self.threshold
        ema = old + (1 - self.threshold_momentum) * (smallest_kept - old)
        new = torch.where(old < 0, smallest_kept, ema)
        self.threshold.copy_(torch.where(torch.isfinite(smallest_kept), new, old))


class _JumpReLUFn(torch.autograd.Function):
    """x * H(x - theta); d/dtheta by the rectangle-kernel straight-through estimator.

    Rajamanoharan et al. 2024 ("Jumping Ahead"): d/dtheta = -(theta / eps) * K((x - theta) / eps),
    K = 1 on (-1/2, 1/2). The gradient w.r.t. x is the ordinary one, H(x - theta).
    """

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((x - theta) / eps).abs() < 0.5
        grad_theta = (-(theta / eps) * kernel * grad).sum(0)
        return grad * (x > theta), grad_theta, None


class _StepFn(torch.autograd.Function):
    """H(x - theta), whose only gradient is the straight-through one w.r.t. theta.

    d/dtheta = -(1 / eps) * K((x - theta) / eps); x gets none, as in the paper, so the L0 penalty
    moves thresholds rather than shrinking pre-activations.
    """

    @staticmethod
    def forward(ctx, x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((x - theta) / eps).abs() < 0.5
        grad_theta = (-(1.0 / eps) * kernel * grad).sum(0)
        return torch.zeros_like(x), grad_theta, None


class JumpReLUDictionary(Dictionary):
    """Per-latent learned thresholds and a direct L0 penalty (SAE only)."""

    architecture = "jumprelu"

    def __init__(self, spec: DictionarySpec, n_models: int, d_model: int,
                 scales: list[float] | None = None) -> None:
        if n_models != 1:
            raise ValueError("jumprelu is available for SAEs only (one model); use relu, topk or "
                             "batchtopk for crosscoders")
        super().__init__(spec, n_models, d_model, scales)
        # log-parametrised so the threshold stays positive under any optimizer step
        self.log_threshold = nn.Parameter(
            torch.full((self.n_latents,), math.log(spec.jumprelu_threshold_init)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        return _JumpReLUFn.apply(pre, self.threshold, self.spec.jumprelu_bandwidth)

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        l0 = _StepFn.apply(pre, self.threshold, self.spec.jumprelu_bandwidth).sum(1).mean()
        return self.spec.l0_coefficient * l0, {"l0_penalty": l0}


ARCHITECTURES: dict[str, type[Dictionary]] = {
    "relu": ReLUDictionary,
    "topk": TopKDictionary,
    "batchtopk": BatchTopKDictionary,
    "jumprelu": JumpReLUDictionary,
}


def build_dictionary(spec: DictionarySpec, n_models: int, d_model: int,
                     scales: list[float] | None = None) -> Dictionary:
    """A fresh dictionary for `spec`: an SAE for one model, a crosscoder for several."""
    try:
        cls = ARCHITECTURES[spec.architecture]
    except KeyError:
        raise ValueError(f"unknown architecture {spec.architecture!r}; "
                         f"use one of {', '.join(ARCHITECTURES)}") from None
    return cls(spec, n_models, d_model, scales)


def load_dictionary(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Rebuild a saved dictionary from config.json and its safetensors weights (strictly)."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    spec = DictionarySpec(**config["spec"])
    if spec.architecture != config["architecture"]:
        raise ValueError(f"{directory / CONFIG_FILE}: architecture {config['architecture']!r} "
                         f"disagrees with spec.architecture {spec.architecture!r}")
    model = build_dictionary(spec, config["n_models"], config["d_model"], config["scales"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.folded = bool(config["folded"])
    return model.to(device)


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)
