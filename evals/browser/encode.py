"""The pass's encode: a batch's active codes as (latent, value, row) entries, without dense codes.

On a CPU the encode is the pass: a [rows, models * d] x [models * d, latents] matmul, then the
few active codes picked out of it. Picking them out of dense [rows, latents] codes (relu over
them, then nonzero) cost as much again as the matmul: every pass over a 64 MiB tensor is
memory-bound. So the pre-activations are made a block of latents at a time (a few MiB, still in
cache when they are compared), and for the architectures whose codes are an elementwise rule on
the pre-activation, the rule is applied to the block directly:

- relu: active where pre > 0;
- jumprelu: where pre > theta (the latent's threshold);
- batchtopk at inference: where pre > 0 and its norm-weighted value exceeds the global threshold.

Anything else (TopK: a code depends on the whole row; an architecture added later, or one whose
`_activate` is overridden) goes through `dictionary.encode` a block of rows at a time, and its
nonzero codes are read off. Either way the values are those `dictionary.encode` gives (the same
fp32 pre-activations, up to the last bit of the matmul's summation order), and the entries come
sorted by (latent, row): collectors can segment by latent without sorting.

bfloat16 matmuls are about twice as fast on CPUs with avx512_bf16, but they move every code by up
to ~0.4% and flip latents near their thresholds, so the pass stays in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

BLOCK_CODES = 1 << 21  # pre-activations made at once: 8 MiB of fp32, cache-sized


def _rule(dictionary) -> str | None:
    """The elementwise rule of the dictionary's codes, or None if they need the dense encode."""
    from trainer import architectures as A

    act = type(dictionary)._activate
    if act is A.ReLUDictionary._activate:
        return "relu"
    if act is A.JumpReLUDictionary._activate:
        return "jumprelu"
    if act is A.BatchTopKDictionary._activate and not dictionary.training:
        return "batchtopk"
    return None


def _above(pre: Tensor, floor: Tensor | None) -> Tensor:
    """Flat (row-major) indices of pre [b, w] > floor ([w], or 0 when None), ascending. On a CPU
    numpy's compare and flatnonzero are several times faster than torch's nonzero."""
    if pre.device.type == "cpu":
        p = pre.numpy()
        return torch.from_numpy(np.flatnonzero(p > 0 if floor is None else p > floor.numpy()))
    return (pre > (0 if floor is None else floor)).reshape(-1).nonzero().squeeze(1)


def _by_latent(idx: Tensor, b: int, w: int) -> tuple[Tensor, Tensor]:
    """(latent, row) of flat row-major indices into [b, w], sorted by (latent, row)."""
    row, lat = idx // w, idx % w
    order = torch.argsort(lat * b + row)
    return lat[order], row[order]


def _weights(dictionary, rule: str) -> Tensor | None:
    if rule == "batchtopk" and not dictionary.unit_norm_decoder:
        return dictionary._selection_weights().detach().float()
    return None


@torch.no_grad()
def sparse_encode(dictionary, x: Tensor, *, block_codes: int = BLOCK_CODES) -> tuple[Tensor, Tensor, Tensor]:
    """Active codes of x [b, n_models, d] as (latent, value, row), sorted by latent then row.

    Equal (up to the matmul's rounding) to the nonzero entries of `dictionary.encode(x)`."""
    rule = _rule(dictionary)
    b, L = x.shape[0], dictionary.n_latents
    dev = x.device
    if rule is None:
        return _dense_fallback(dictionary, x, block_codes)
    W = dictionary.W_enc.detach().reshape(-1, L)
    flat = (x.to(W.dtype) - dictionary.b_dec.detach()).reshape(b, -1)
    b_enc = dictionary.b_enc.detach()
    theta = dictionary.threshold.detach().float() if rule == "jumprelu" else None
    weights = _weights(dictionary, rule)
    width = max(1, min(L, block_codes // max(b, 1)))
    buf = torch.empty((b, width), dtype=W.dtype, device=dev)
    lats, vals, rows = [], [], []
    for s in range(0, L, width):
        e = min(L, s + width)
        pre = torch.addmm(b_enc[s:e], flat, W[:, s:e], out=buf[:, :e - s])
        idx = _above(pre, theta[s:e] if theta is not None else None).to(dev)
        lat, row = _by_latent(idx, b, e - s)
        val = pre[row, lat]
        if rule == "batchtopk":
            w = weights[s:e].index_select(0, lat) if weights is not None else None
            keep = (val * w if w is not None else val) > dictionary.threshold
            lat, row, val = lat[keep], row[keep], val[keep]
        lats.append(lat + s)
        vals.append(val.float())
        rows.append(row)
    return torch.cat(lats), torch.cat(vals), torch.cat(rows)


def _dense_fallback(dictionary, x: Tensor, block_codes: int) -> tuple[Tensor, Tensor, Tensor]:
    """dictionary.encode a block of rows at a time; entries sorted by (latent, row)."""
    b, L = x.shape[0], dictionary.n_latents
    step = max(1, block_codes // L)
    lats, vals, rows = [], [], []
    for s in range(0, b, step):
        f = dictionary.encode(x[s:s + step])
        lat, row = _by_latent(f.reshape(-1).nonzero().squeeze(1), f.shape[0], L)
        lats.append(lat)
        vals.append(f[row, lat].float())
        rows.append(row + s)
    lat, val, row = torch.cat(lats), torch.cat(vals), torch.cat(rows)
    order = torch.argsort(lat * b + row)  # blocks of rows interleave latents: one sort restores the order
    return lat[order], val[order], row[order]


def encode_column_sparse(dictionary, x: Tensor, which: Sequence[int], **kw) -> tuple[Tensor, Tensor, Tensor]:
    """Active codes of one column from a batch x [b, n_arrays, d] (see evals/browser/collect.py)."""
    return sparse_encode(dictionary, x[:, list(which), :].float(), **kw)
