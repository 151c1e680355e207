"""The dictionary architectures, and the one registry of them that everything else reads.

Each architecture is one class here: how pre-activations become codes, its sparsity penalty, and
its traits (uses k, available for crosscoders, L1 penalty, dead-latent resampling, display label;
declared on `trainer.dictionary.Dictionary`). `ARCHITECTURES` maps the names configs use to the
classes; the config checks (trainer/config.py: the allowed names, which keys apply), the trainer's
per-step schedules and `build_dictionary` all read it. Adding an architecture is a class here and
its entry in `ARCHITECTURES` (plus its tests), nothing else.

The loss terms, added to the shared mse (trainer/dictionary.py):

    relu       loss = mse + l1_coefficient * l1,  l1 = mean_b sum_j c_j f_j * sum_n ||W_dec[j, n]||
               (c_j = shared_penalty_factor for designated shared latents, else 1)
    topk       loss = mse + aux_coefficient * aux
    batchtopk  loss = mse + aux_coefficient * aux
    jumprelu   loss = mse + l0_coefficient * l0_penalty,  l0_penalty = mean_b sum_j H(pre_j - theta_j)

The AuxK term (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", section A.2) models
the main reconstruction's error e = x - x_hat (a detached target) with the `aux_k` largest
pre-activations among the dead latents, decoded without b_dec, normalised by the variance of e:

    aux = sum_{b,n,d} (e - e_hat)^2 / sum_{b,n,d} (e - mean_b e)^2,   e_hat = einsum(z, W_dec)

where z keeps the top aux_k (default d_model/2, as Gao et al.; capped at the number of dead latents)
of relu(pre) over the dead latents per token. It is zero when no latent is dead (or aux_k = 0). The
normalisation makes aux_coefficient (Gao et al.: 1/32) independent of the activation scale.

TopK and BatchTopK keep their codes sparse in the training objective when the measured rule
(`trainer.sparse_decode.prefers_sparse`) says it pays: the decode, AuxK's decode and every gradient
then touch the kept codes only, and the results match the dense path within float rounding;
`sparse_decode` on an instance forces either path.

Decoder rows are held at unit norm (per model) by TopK and BatchTopK SAEs and by JumpReLU:
`Dictionary.constrain_` after each step, `remove_parallel_grads_` before it. For JumpReLU this is
what gives the threshold and the straight-through bandwidth a fixed unit: without it, scaling
W_enc, b_enc and theta by c and W_dec by 1/c leaves the loss unchanged while the bandwidth, an
absolute width, does not scale, so its width relative to the codes would drift. The L0 penalty
counts codes, so the constraint leaves it (and l0_coefficient's meaning) unchanged; this is what
Rajamanoharan et al. 2024 and dictionary_learning's JumpReLU trainer do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer import latent_partition as LP
from trainer.dictionary import EPS, Dictionary
from trainer.sparse_decode import Encoding, Pattern, SparseCodes, prefers_sparse

if TYPE_CHECKING:
    from trainer.config import DictionarySpec


class ReLUDictionary(Dictionary):
    """ReLU codes with the decoder-norm-weighted L1 (Anthropic's crosscoder penalty).

    Weighting by decoder norm stops the optimiser from dodging the L1 by shrinking codes and
    growing decoder rows, so no norm constraint is needed. Designated shared latents
    (trainer/latent_partition.py) pay `shared_penalty_factor` times their term:

        l1 = mean_b sum_j c_j f_bj sum_n ||W_dec[j, n]||,   c_j = shared_penalty_factor (j shared) else 1

    since an L1 on the sum of decoder norms charges a latent that reconstructs every model more
    than one that reconstructs one, which is what splits shared structure into exclusive latents.
    """

    architecture = "relu"
    label = r"ReLU ($\ell_1$)"
    l1_penalty = True
    resamples_dead = True

    def __init__(self, spec: DictionarySpec, n_models: int, d_model: int,
                 scales: list[float] | None = None) -> None:
        super().__init__(spec, n_models, d_model, scales)
        # c_j (None: all 1): a function of the spec, recomputed on build, so not saved with the weights
        factor = None if self.partition is None else LP.l1_latent_factor(self.partition,
                                                                          LP.shared_penalty_factor(spec))
        self.register_buffer("l1_latent_factor", factor, persistent=False)

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        return torch.relu(pre)

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        coef = self.spec.l1_coefficient if l1_coefficient is None else l1_coefficient
        weights = self._selection_weights()
        if self.l1_latent_factor is not None:
            weights = weights * self.l1_latent_factor
        # mean_b sum_j f_bj w_j, as (mean_b f_b) . w: no [batch, latents] temporary either way
        l1 = f.mean(0) @ weights
        return coef * l1, {"l1": l1}


class TopKDictionary(Dictionary):
    """Exactly the k largest codes per token (Gao et al. 2024), with AuxK against dead latents.

    Latents are ranked by f_j * sum_n ||W_dec[j, n]||: for an SAE the decoder rows are held at unit
    norm and this is f_j; a crosscoder has no constraint, so the weighting is what makes codes of
    differently-scaled latents comparable.
    """

    architecture = "topk"
    label = "TopK"
    uses_k = True
    # None: `trainer.sparse_decode.prefers_sparse` picks the dense or the sparse step; True/False
    # forces one (set on an instance: the tests and benchmarks compare the two)
    sparse_decode: bool | None = None

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

    def _sparse(self, codes_per_token: float, like: Tensor) -> bool:
        """Whether this step keeps its codes sparse: `sparse_decode`, else the measured rule."""
        if self.sparse_decode is not None:
            return self.sparse_decode
        return like.dtype in (torch.float32, torch.float64) and prefers_sparse(
            codes_per_token, self.n_latents, self.d_model * self.n_models, like.device)

    def _codes(self, pre: Tensor, k: int | None, encoding: Encoding | None = None
               ) -> tuple[Tensor | SparseCodes, Tensor, Tensor | None]:
        # ranking pre-activations (weights > 0) picks the same latents as ranking relu(pre), so
        # the relu only touches the chosen values, and a code is active exactly where its ranked
        # value is positive: L0, the counters and the smallest kept code come from the selection
        # (batch * k values), not from more passes over the dense [batch, latents] codes
        idx, ranked = self._select(pre.detach(), k)
        active = ranked > 0
        counts = torch.zeros(self.n_latents, dtype=torch.float32, device=pre.device)
        counts.index_add_(0, idx % self.n_latents, active.to(torch.float32))
        smallest = torch.where(active, ranked, math.inf).min()
        if encoding is not None and self._sparse(idx.numel() / max(pre.shape[0], 1), pre):
            pattern = Pattern.from_flat(idx, pre.shape[0], self.n_latents)
            return SparseCodes(pattern, torch.relu(encoding.at(pattern)), encoding), counts, smallest
        flat = pre.flatten()
        f = torch.zeros_like(flat).scatter_(0, idx, torch.relu(flat.gather(0, idx))).view_as(pre)
        return f, counts, smallest

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        encoding = f.encoding if isinstance(f, SparseCodes) else None
        aux = self._aux_loss(pre, x, x_hat, dead_mask, encoding)
        return self.spec.aux_coefficient * aux, {"aux": aux}

    @property
    def aux_k(self) -> int:
        """How many dead latents AuxK may use per token: the spec's, by default d_model / 2.

        Gao et al.'s choice: about as many as the residual has directions to explain, so a dead
        latent is revived whenever its pre-activation is among the larger half of that many
        (2k, for d = 2048 and k = 32, would be 64 against 1024, and reaches few dead latents).
        Capped at the number of dead latents where it is used; at least 1 (d_model = 1).
        """
        return max(1, self.d_model // 2) if self.spec.aux_k is None else self.spec.aux_k

    def _aux_loss(self, pre: Tensor, x: Tensor, x_hat: Tensor, dead_mask: Tensor | None,
                  encoding: Encoding | None = None) -> Tensor:
        """The AuxK term; with `encoding` (a sparse step) its codes reach the encoder through the
        chosen entries only, and it decodes them sparsely too when the rule says so."""
        zero = pre.new_zeros(())
        aux_k = self.aux_k
        if dead_mask is None or aux_k == 0:
            return zero
        # the dead latents' columns only: the cost scales with how many are dead, not with the
        # dictionary (the index list is one host sync, as counting them would be)
        dead = dead_mask.to(device=pre.device, dtype=torch.bool).nonzero().squeeze(1)
        n_dead = dead.numel()
        if n_dead == 0:
            return zero
        e = (x - x_hat).detach()
        everyone = n_dead == self.n_latents  # then no column copies are needed
        batch = pre.shape[0]
        with torch.no_grad():  # which entries: the top aux_k relu(pre) of the dead, per token
            dead_pre = torch.relu(pre.detach() if everyone else pre.detach().index_select(1, dead))
            top = dead_pre.topk(min(aux_k, n_dead), dim=1, sorted=False).indices
            latents = top if everyone else dead[top]
            rows = torch.arange(batch, device=pre.device)[:, None] * self.n_latents
            pattern = Pattern.from_flat((latents + rows).flatten(), batch, self.n_latents)
        values = torch.relu(encoding.at(pattern) if encoding is not None
                            else pre.flatten().gather(0, pattern.flat))
        # the rule alone picks AuxK's decode (`sparse_decode` forces only the main step's path)
        if encoding is not None and prefers_sparse(top.shape[1], n_dead, self.d_model * self.n_models, pre.device):
            e_hat = SparseCodes(pattern, values).decode(self.W_dec).view_as(e)
        else:
            w_dec = self.W_dec if everyone else self.W_dec.index_select(0, dead)
            column = pattern.latents if everyone else torch.searchsorted(dead, pattern.latents)
            z = values.new_zeros(batch, n_dead).index_put((pattern.rows, column), values)
            e_hat = (z @ w_dec.reshape(n_dead, -1)).view_as(e)
        reduce = getattr(self, "batch_reduce", None)  # trainer/distributed.py BatchReduce: one slice of the batch
        if reduce is None:
            return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(EPS)
        # the whole batch's normalisation; times the number of slices, since the trainer averages
        # the slices' gradients and terms: their mean is then sum_slices(numerator) / denominator
        return reduce.world_size * (e - e_hat).pow(2).sum() / reduce.variance_sum(e).clamp_min(EPS)


class BatchTopKDictionary(TopKDictionary):
    """The batch*k largest codes over a training batch (Bussmann et al. 2024): k on average.

    Inference must not depend on the batch, so training also estimates a global threshold: after
    each training `loss` call, the smallest kept (norm-weighted) code of that batch is folded into
    an exponential moving average (factor 0.99; the first batch sets it). In eval mode a code is
    kept when its norm-weighted value exceeds `threshold`. A negative threshold means "not yet
    estimated"; eval then keeps every positive code.
    """

    architecture = "batchtopk"
    label = "BatchTopK"
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
        reduce = getattr(self, "batch_reduce", None)  # trainer/distributed.py BatchReduce: one slice of the batch
        if reduce is None or not self.training:
            top = self._ranked(pre).flatten().topk(pre.shape[0] * self._k(k), sorted=False)
            return top.indices, top.values
        # pre holds one of world_size equal slices of the batch: the batch's k*B largest are those
        # above the k*B-th largest t of all slices' candidates (each slice's own k*B largest, or all
        # it has), plus as many codes equal to t as make k*B, taken in slice order. Equal values
        # come from duplicate rows (the same token in the same context), whose codes are
        # interchangeable: whichever one process's top-k keeps, the step is the same.
        n = pre.shape[0] * reduce.world_size * self._k(k)
        local = self._ranked(pre).flatten()
        top = local.topk(min(n, local.numel()), sorted=False)
        everyone = reduce.gather(top.values)
        threshold = everyone.topk(min(n, everyone.numel()), sorted=False).values.min()
        above, tied = top.values > threshold, top.values == threshold
        counts = reduce.gather(torch.stack([above.sum(), tied.sum()])[None]).tolist()
        rank = reduce.rank
        ties_before = sum(t for _, t in counts[:rank])
        room = max(0, n - sum(a for a, _ in counts) - ties_before)
        tied_idx = tied.nonzero().squeeze(1)
        tied_idx = tied_idx[top.indices[tied_idx].argsort()[:room]]
        keep = torch.cat([above.nonzero().squeeze(1), tied_idx])
        return top.indices[keep], top.values[keep]

    def _codes(self, pre: Tensor, k: int | None, encoding: Encoding | None = None
               ) -> tuple[Tensor | SparseCodes, Tensor, Tensor | None]:
        if self.training:
            return super()._codes(pre, k, encoding)
        if encoding is None or not self._sparse(1.0, pre):
            return Dictionary._codes(self, pre, k)
        # inference: the codes past the threshold, a count that varies per token. Kept exactly
        # where the dense codes relu(pre) * (ranked > threshold) are positive.
        with torch.no_grad():
            keep = (encoding.pre > 0) & (self._ranked(encoding.pre) > self.threshold)
            idx = keep.flatten().nonzero().squeeze(1)
        if not self._sparse(idx.numel() / max(pre.shape[0], 1), pre):
            return Dictionary._codes(self, pre, k)
        pattern = Pattern.from_flat(idx, pre.shape[0], self.n_latents)
        counts = torch.bincount(pattern.latents, minlength=self.n_latents).to(torch.float32)
        return SparseCodes(pattern, torch.relu(encoding.at(pattern)), encoding), counts, None

    @torch.no_grad()
    def set_threshold_(self, threshold: Tensor | float | None) -> None:
        self.threshold.fill_(float(threshold))

    @torch.no_grad()
    def _observe_training_batch(self, smallest_kept: Tensor | None) -> None:
        # tensor ops only: no host sync on the training hot path
        if smallest_kept is None:
            return
        reduce = getattr(self, "batch_reduce", None)
        if reduce is not None:  # the smallest kept over the whole batch (inf where a slice kept none)
            smallest_kept = reduce.min(smallest_kept.reshape(1)).reshape(())
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
    """Per-latent learned thresholds and a direct L0 penalty (SAE only), with unit-norm decoder rows.

    The constraint pins the scale of the codes (a unit of f is a unit of reconstruction), so the
    thresholds and `jumprelu_bandwidth` are in the normalized activations' units throughout
    training, as in the reference trainers.
    """

    architecture = "jumprelu"
    label = "JumpReLU"
    crosscoders = False

    @property
    def unit_norm_decoder(self) -> bool:
        return True

    def __init__(self, spec: DictionarySpec, n_models: int, d_model: int,
                 scales: list[float] | None = None) -> None:
        super().__init__(spec, n_models, d_model, scales)
        # log-parametrised so the threshold stays positive under any optimizer step
        self.log_threshold = nn.Parameter(
            torch.full((self.n_latents,), math.log(spec.jumprelu_threshold_init)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    @torch.no_grad()
    def set_threshold_(self, threshold: Tensor | float | None) -> None:
        """Per-latent thresholds [m] (or one for all); values <= 0 mean "every positive
        pre-activation passes", which is threshold 0 (log 0 = -inf)."""
        theta = torch.as_tensor(threshold, dtype=torch.float32).expand(self.n_latents)
        self.log_threshold.copy_(theta.clamp_min(0).log())

    def _activate(self, pre: Tensor, k: int | None) -> Tensor:
        return _JumpReLUFn.apply(pre, self.threshold, self.spec.jumprelu_bandwidth)

    def _penalty(self, pre, f, x, x_hat, *, k, l1_coefficient, dead_mask):
        l0 = _StepFn.apply(pre, self.threshold, self.spec.jumprelu_bandwidth).sum(1).mean()
        return self.spec.l0_coefficient * l0, {"l0_penalty": l0}


# The registry, in the order names are listed to users (config errors, report tables).
ARCHITECTURES: dict[str, type[Dictionary]] = {
    cls.architecture: cls for cls in (ReLUDictionary, TopKDictionary, BatchTopKDictionary, JumpReLUDictionary)
}


def names(**traits: bool) -> tuple[str, ...]:
    """The architectures whose traits have these values, in registry order, e.g. names(uses_k=True)."""
    return tuple(name for name, cls in ARCHITECTURES.items()
                 if all(getattr(cls, trait) == value for trait, value in traits.items()))


def spoken(items: tuple[str, ...] | list[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c': a list of names as a sentence says it."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conjunction} {items[-1]}"
