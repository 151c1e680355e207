"""Sparse codes in the training step: decode and backpropagate through the kept codes only.

A TopK or BatchTopK step keeps k of n_latents codes per token, yet the dense path spends five
[batch, n_latents] x [n_latents, n_models * d_model] products on them: the decode, its two
gradients (into W_dec and into the codes), and the encoder's two (into W_enc, and into x - b_dec for
b_dec's gradient), every one multiplying zeros. Here only the encoder's forward product stays dense
(it is what ranks the latents); the rest costs batch * k * n_models * d_model:

    x_hat  = embedding_bag(latents, W_dec, per_sample_weights=values) + b_dec     (gather and sum)
    dW_dec = C^T @ dx_hat             C: the codes as a CSR [batch, n_latents] (rows by latent)
    dvalue = <dx_hat[b], W_dec[j]>    at the kept (b, j) only (sampled_addmm)
    dW_enc = (G^T @ (x - b_dec))^T    G: the codes' gradients, CSR by latent
    db_enc = index_add(G), db_dec (through the encoder) = -W_enc @ db_enc

Gradients agree with the dense path within float32 rounding (tests/trainer/test_sparse_decode.py).
`prefers_sparse` is the rule that picks the path, with the measurements behind it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The rule's threshold: sparse on CPU when codes per token <= this fraction of n_latents (see
# `prefers_sparse`, whose docstring has the measurements).
CPU_SPARSE_FRACTION = 1 / 16


def prefers_sparse(codes_per_token: float, n_latents: int, d_model: int, device: torch.device | str) -> bool:
    """Whether to decode (and backpropagate) through the kept codes only instead of dense products.

    CPU: sparse when codes_per_token <= n_latents / 16. The dense step spends ~5 GEMMs of
    batch * n_latents * d_model beyond the encoder's forward one, the sparse step ~batch * k *
    d_model gathers and scatters at several times a GEMM's cost per element, so what decides is
    k / n_latents. Measured with benchmarks/bench_train_step.py on this project's 2-core CPU
    (loaded by other jobs; whole TopK training steps, sparse-over-dense speed-up in CPU time):

        d_model, latents, batch    k/m = 1/128   1/32    1/8     1/4     1/2
        512, 4096, 1024            1.80x         1.34x   0.84x   0.75x   0.47x
        256, 16384, 1024           1.26x         1.14x   0.79x
        2048, 16384, 4096 (k 32, 1/512): 3.43x TopK, 2.91x BatchTopK

    Sparse wins up to 1/32 and loses from 1/8 at both sizes; 1/16 splits the difference. d_model
    is taken so the rule can grow a size term if a measurement asks for one; none has.

    CUDA (and anything else): dense. No GPU was measured here; cuBLAS GEMMs on tensor cores run
    near peak while embedding_bag's backward and CSR products are memory-bound scatters, and
    sparsify needs its own Triton kernel to win on a GPU. Change this only with a measurement.
    """
    del d_model  # no measured dependence (see above)
    if torch.device(device).type != "cpu":
        return False
    return 0 < n_latents and codes_per_token <= CPU_SPARSE_FRACTION * n_latents


@dataclass(frozen=True)
class Pattern:
    """Where the kept codes are: (row, latent) pairs sorted by row, then latent."""

    rows: Tensor  # [N] int64
    latents: Tensor  # [N] int64
    row_ptr: Tensor  # [batch + 1] int64: row b's codes are [row_ptr[b], row_ptr[b + 1])
    batch: int
    n_latents: int

    @classmethod
    def from_flat(cls, idx: Tensor, batch: int, n_latents: int) -> Pattern:
        """From flat indices into a [batch, n_latents] tensor, in any order (BatchTopK's are not
        grouped by row); sorting them is batch * k work, small beside one dense product."""
        idx = idx[_argsort(idx)]
        rows = torch.div(idx, n_latents, rounding_mode="floor")
        row_ptr = torch.zeros(batch + 1, dtype=torch.long, device=idx.device)
        row_ptr[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
        return cls(rows, idx - rows * n_latents, row_ptr, batch, n_latents)

    @property
    def flat(self) -> Tensor:
        return self.rows * self.n_latents + self.latents

    def by_row(self, values: Tensor) -> Tensor:
        """CSR [batch, n_latents] holding `values` at the pattern."""
        return _csr(self.row_ptr, self.latents, values, (self.batch, self.n_latents))

    def by_latent(self, values: Tensor) -> Tensor:
        """CSR [n_latents, batch] (the transpose) holding `values`: what index_add-style scatters into
        per-latent rows become, as one multithreaded sparse product."""
        order = _argsort(self.latents * self.batch + self.rows)
        ptr = torch.zeros(self.n_latents + 1, dtype=torch.long, device=values.device)
        ptr[1:] = torch.bincount(self.latents, minlength=self.n_latents).cumsum(0)
        return _csr(ptr, self.rows[order], values[order], (self.n_latents, self.batch))


def _argsort(keys: Tensor) -> Tensor:
    """argsort of int64 keys; on a CPU through numpy, whose radix sort took 7-15 ms for 131k-262k
    keys on this project's machine where torch's took 160-180 ms (int64) or 40-55 ms (as float64)."""
    if keys.device.type == "cpu":
        return torch.from_numpy(keys.numpy().argsort(kind="stable"))
    return torch.argsort(keys)


def _csr(ptr: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor built from indices made here (valid by construction, so unchecked); torch's
    notice that CSR support is in beta would otherwise print once per process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(ptr, columns, values, size, check_invariants=False)


class _Decode(torch.autograd.Function):
    """sum_j values[b, j] * W[j] per row b; backward into the values and W at the pattern only."""

    @staticmethod
    def forward(ctx, values: Tensor, w: Tensor, pattern: Pattern) -> Tensor:
        ctx.save_for_backward(values, w)
        ctx.pattern = pattern
        return F.embedding_bag(pattern.latents, w, pattern.row_ptr[:-1], mode="sum",
                               per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, w = ctx.saved_tensors
        p: Pattern = ctx.pattern
        grad = grad.contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # <grad[b], W[j]> at the kept (b, j) only: sampled dense-dense product
            grad_values = torch.sparse.sampled_addmm(p.by_row(torch.zeros_like(values)), grad, w.t(),
                                                     beta=0.0).values()
        if ctx.needs_input_grad[1]:
            grad_w = p.by_latent(values) @ grad
        return grad_values, grad_w, None


class _SelectedPre(torch.autograd.Function):
    """The pre-activations at the pattern, differentiable into W_enc, b_enc and b_dec with work on
    the kept entries only (the dense path's gradient is a [batch, n_latents] tensor of zeros but
    for these, multiplied through two dense products)."""

    @staticmethod
    def forward(ctx, pre: Tensor, centred: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                pattern: Pattern) -> Tensor:
        ctx.save_for_backward(centred, w_enc)
        ctx.pattern = pattern
        ctx.b_dec_shape = b_dec.shape
        return pre.reshape(-1).gather(0, pattern.flat)

    @staticmethod
    def backward(ctx, grad: Tensor):
        centred, w_enc = ctx.saved_tensors
        p: Pattern = ctx.pattern
        grad_w = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[2]:
            # [n_latents, n*d] from the CSR product, laid back as W_enc's [n*d, n_latents]
            grad_w = (p.by_latent(grad) @ centred).t().contiguous()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            grad_b_enc = torch.zeros(p.n_latents, dtype=grad.dtype, device=grad.device).index_add_(
                0, p.latents, grad)
            if ctx.needs_input_grad[4]:
                # pre = (x - b_dec) @ W_enc + b_enc, so d/db_dec = -W_enc @ (sum over the batch of dpre)
                grad_b_dec = -(w_enc @ grad_b_enc).reshape(ctx.b_dec_shape)
        return None, None, grad_w, grad_b_enc, grad_b_dec, None


@dataclass(frozen=True)
class Encoding:
    """The dense pre-activations (no graph: only the ranking reads them all) and the way from any
    chosen entries of them back to the encoder's parameters."""

    pre: Tensor  # [batch, n_latents], detached
    centred: Tensor  # [batch, n_models * d_model]: x - b_dec, detached
    w_enc: Tensor  # [n_models * d_model, n_latents]: a view of the parameter
    b_enc: Tensor
    b_dec: Tensor

    def at(self, pattern: Pattern) -> Tensor:
        """[N] the pre-activations at `pattern`, with sparse gradients into the parameters."""
        return _SelectedPre.apply(self.pre, self.centred, self.w_enc, self.b_enc, self.b_dec, pattern)


@dataclass(frozen=True)
class SparseCodes:
    """Codes as (pattern, values): what a TopK or BatchTopK step keeps, without the zeros."""

    pattern: Pattern
    values: Tensor  # [N], differentiable
    encoding: Encoding | None = None  # set when the values came from an `Encoding` (AuxK reuses it)

    def dense(self) -> Tensor:
        """[batch, n_latents] with zeros elsewhere (what the dense path calls f)."""
        p = self.pattern
        flat = self.values.new_zeros(p.batch * p.n_latents).index_put_((p.flat,), self.values)
        return flat.view(p.batch, p.n_latents)

    def decode(self, w_dec: Tensor, b_dec: Tensor | None = None) -> Tensor:
        """[batch, n_models, d_model]: the reconstruction from W_dec [n_latents, n_models, d_model]
        (without a bias for AuxK's, which models an error)."""
        out = _Decode.apply(self.values, w_dec.reshape(w_dec.shape[0], -1), self.pattern)
        if b_dec is not None:
            out = out + b_dec.reshape(-1)
        return out.view(self.pattern.batch, *w_dec.shape[1:])

    @classmethod
    def of_dense(cls, f: Tensor) -> SparseCodes:
        """The nonzero entries of dense codes f [batch, n_latents] (gradients flow back into f)."""
        flat = f.reshape(-1)
        idx = flat.nonzero().squeeze(1)
        return cls(Pattern.from_flat(idx, f.shape[0], f.shape[1]), flat.gather(0, idx))


class Terms(Mapping[str, Tensor]):
    """`Dictionary.loss`'s terms, read-only. After a sparse step "f" (the dense codes) is built on
    first read: the step itself never needs it, and building it costs a [batch, n_latents] tensor.
    Iterating names (`for name in terms`) builds nothing; `items()` and `values()` read "f" too."""

    def __init__(self, terms: dict[str, Tensor], codes: SparseCodes | Tensor) -> None:
        self._terms = dict(terms)
        if isinstance(codes, Tensor):
            self._terms["f"] = codes
        self._codes = codes

    def __getitem__(self, key: str) -> Tensor:
        if key == "f" and key not in self._terms:
            self._terms["f"] = self._codes.dense().detach()
        return self._terms[key]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._terms, *(() if "f" in self._terms else ("f",))])

    def __len__(self) -> int:
        return len(self._terms) + ("f" not in self._terms)
