"""Logit effects: the tokens each latent's decoder direction promotes and suppresses, per model.

As the logit lens reads a residual direction: through the final norm folded into the
unembedding, scores = (centre(d) * gamma) @ W_U^T, where d is the latent's decoder row for that
model in raw units (the stored decoder is in normalized units: divided by the model's scale; only
the direction matters for which tokens come out on top), gamma the final norm's effective weight
(Gemma's RMSNorm multiplies by 1 + weight: read off the module by normalizing a vector of ones),
and centre() subtracts the mean over d_model for a LayerNorm (which centres its input) and
nothing for an RMSNorm. The norm's division by the residual's size and any bias are ignored: they
rescale or shift every token alike. Scores are per unit of activation.

The unembedding and the norm come from the model loaded by pipeline.models (tests: tiny random
models); scores are computed for blocks of latents, so memory is one [block, vocab] matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# HF config.model_type -> attribute path of the final norm (default: model.norm)
FINAL_NORM_PATHS = {"gpt_neox": "gpt_neox.final_layer_norm", "bloom": "transformer.ln_f", "gpt2": "transformer.ln_f"}


class LogitLensError(ValueError):
    """The model's final norm or unembedding cannot be found."""


@dataclass
class LensWeights:
    unembed: torch.Tensor  # [vocab, d] float32
    gamma: torch.Tensor  # [d] float32
    center: bool  # LayerNorm: centre directions before scaling


def _module(model: nn.Module, path: str) -> nn.Module:
    m = model
    for part in path.split("."):
        if not hasattr(m, part):
            raise LogitLensError(f"{type(model).__name__} has no {path!r} (the final norm); add its path "
                                 "to evals.browser.logit_effects.FINAL_NORM_PATHS")
        m = getattr(m, part)
    return m


def lens_weights(model: nn.Module) -> LensWeights:
    """The unembedding, the final norm's effective weight, and whether it centres."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    norm = _module(model, FINAL_NORM_PATHS.get(model_type, "model.norm"))
    out = model.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None:
        raise LogitLensError(f"{type(model).__name__} has no output embedding (unembedding) to read logits with")
    unembed = out.weight.detach().float()
    d = unembed.shape[1]
    center = isinstance(norm, nn.LayerNorm) or "LayerNorm" in type(norm).__name__
    if center:
        w = getattr(norm, "weight", None)
        gamma = torch.ones(d, device=unembed.device) if w is None else w.detach().float()
    else:  # an RMSNorm maps ones (rms 1) to its effective weight / sqrt(1 + eps)
        p = next(norm.parameters(), None)
        eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 0.0) or 0.0)
        ones = torch.ones(1, d, dtype=p.dtype if p is not None else torch.float32, device=unembed.device)
        with torch.no_grad():
            gamma = norm(ones)[0].float() * (1.0 + eps) ** 0.5
    return LensWeights(unembed, gamma.to(unembed.device), center)


@dataclass
class LogitEffects:
    """Per latent: the `n` most promoted and suppressed token ids with their scores, and a
    histogram of the scores over the whole vocabulary (bins between each latent's min and max)."""

    top_ids: np.ndarray  # [L, n] descending scores
    top_values: np.ndarray
    bottom_ids: np.ndarray  # [L, n] ascending scores (most suppressed first)
    bottom_values: np.ndarray
    hist_counts: np.ndarray  # [L, bins]
    hist_lo: np.ndarray  # [L]
    hist_hi: np.ndarray  # [L]


@torch.no_grad()
def logit_effects(directions: torch.Tensor, lens: LensWeights, n: int, *, bins: int = 24,
                  block: int | None = None) -> LogitEffects:
    """Scores of raw-unit decoder directions [L, d] through `lens`, in blocks of latents."""
    W = lens.unembed
    vocab = W.shape[0]
    n = min(n, vocab)
    block = block or max(1, (1 << 24) // vocab)
    L = directions.shape[0]
    out = {k: [] for k in ("ti", "tv", "bi", "bv", "hc", "lo", "hi")}
    for lo in range(0, L, block):
        v = directions[lo:lo + block].to(W.device, torch.float32)
        if lens.center:
            v = v - v.mean(1, keepdim=True)
        s = (v * lens.gamma) @ W.T  # [b, vocab]
        t, b = s.topk(n, dim=1), s.topk(n, dim=1, largest=False)
        mn, mx = s.min(1).values, s.max(1).values
        idx = ((s - mn[:, None]) / (mx - mn).clamp_min(1e-30)[:, None] * bins).long().clamp_(0, bins - 1)
        hc = torch.zeros(s.shape[0], bins, dtype=torch.long, device=s.device).scatter_add_(1, idx, torch.ones_like(idx))
        for k, x in zip(out, (t.indices, t.values, b.indices, b.values, hc, mn, mx)):
            out[k].append(x.cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    return LogitEffects(cat["ti"], cat["tv"], cat["bi"], cat["bv"], cat["hc"], cat["lo"], cat["hi"])


def decoder_directions(W_dec: torch.Tensor, model: int, scale: float) -> torch.Tensor:
    """[L, d] raw-unit decoder rows of one model (stored rows are in normalized units: / scale)."""
    return W_dec[:, model, :].detach().float() / float(scale)
