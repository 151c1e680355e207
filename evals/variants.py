"""The variants a splice evaluation compares, run through a model and scored.

Each variant is one edit of the residual stream at the dictionary's hook, at positions >= 1
(position 0, the attention sink, always keeps the model's own activation): the clean run keeps it,
the spliced run puts the reconstruction in, zero and mean ablation put 0 and the mean activation
in (`Splice`; the values are chosen by `evals.splice`, whose docstring defines them). The variants
of b sequences run as one forward of V*b rows or as V forwards of b (`spliced_final_hidden`), the
edit made through `pipeline.hooks.editing_residual`, and each is scored by its next-token cross
entropy and its KL from the first (clean) variant at positions 1..T-2 (`variant_losses`), without
ever materialising [V*b, T, vocab] logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import HookSpec
from pipeline.hooks import editing_residual, model_name
from trainer.trained import TrainedDictionaryError

VARIANTS = ("clean", "spliced", "zero_ablation", "mean_ablation")
_LOGIT_ELEMENTS = 1 << 24  # float32 logits per variant materialised at once (64 MiB)


class SpliceError(TrainedDictionaryError):
    """The dictionary cannot be spliced into its models (e.g. an imported cache without weights)."""


@dataclass(frozen=True)
class Splice:
    """What one variant puts at positions >= 1 of the hooked site (raw units, the model's scale).

    kind "keep": nothing (the clean run); "set": `value` ([b, T-1, d], or anything broadcasting to
    it, e.g. a [d] mean or a 0-d zero); "add": the model's own activation plus `value`.
    """

    kind: Literal["keep", "set", "add"]
    value: Tensor | None = None

    def write(self, out: Tensor, h: Tensor) -> None:
        """Write this variant's positions >= 1 into `out` (a copy of h, [b, T, d])."""
        if self.kind == "set":
            out[:, 1:] = self.value.to(device=h.device, dtype=h.dtype)
        elif self.kind == "add":
            out[:, 1:] = (h[:, 1:].float() + self.value.to(h.device)).to(h.dtype)
        elif self.kind != "keep":
            raise ValueError(f"unknown splice kind {self.kind!r}")

    def apply(self, h: Tensor) -> Tensor:
        """h: [b, T, d] of this variant; returns the edited copy (h itself for keep)."""
        if self.kind == "keep":
            return h
        out = h.clone()
        self.write(out, h)
        return out


def _edit_stacked(h: Tensor, splices: Sequence[Splice]) -> Tensor:
    """h: [V*b, T, d], variant j in rows [j*b, (j+1)*b). A copy with every variant's edit."""
    b = h.shape[0] // len(splices)
    out = h.clone()
    for j, s in enumerate(splices):
        s.write(out[j * b:(j + 1) * b], h[j * b:(j + 1) * b])
    return out


def _final_hidden(model: nn.Module, ids: Tensor) -> Tensor:
    """The last hidden state (after the final norm), the LM head's input: no [b, T, vocab] logits."""
    out = model.base_model(input_ids=ids, use_cache=False)
    return out[0]


def spliced_final_hidden(model: nn.Module, ids: Tensor, hook: HookSpec, splices: Sequence[Splice],
                         *, batched: bool = True,
                         observe: Callable[[Tensor], None] | None = None) -> Tensor:
    """Final hidden states [V*b, T, d] of every variant of the b sequences `ids`, rows grouped by
    variant. batched: one forward over the ids stacked V times; else one forward per variant
    (the reference, for tests). `observe` sees the first variant's activation at the hook."""
    if batched:
        def edit(h: Tensor) -> Tensor:
            if observe is not None:
                observe(h[: ids.shape[0]])
            return _edit_stacked(h, splices)
        with editing_residual(model, hook, edit):
            return _final_hidden(model, ids.repeat(len(splices), 1))
    outs = []
    for j, s in enumerate(splices):
        def edit(h: Tensor, s=s, first=j == 0) -> Tensor:
            if observe is not None and first:
                observe(h)
            return s.apply(h)
        with editing_residual(model, hook, edit):
            outs.append(_final_hidden(model, ids))
    return torch.cat(outs)


def logits_fn(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """final hidden -> float32 logits, as the CausalLM's forward computes them (incl. softcapping)."""
    head = model.get_output_embeddings()
    if head is None:
        raise SpliceError(f"model {model_name(model)!r} has no output embeddings (LM head)")
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)

    def logits(h: Tensor) -> Tensor:
        z = head(h).float()
        return torch.tanh(z / cap) * cap if cap else z
    return logits


@dataclass
class VariantLosses:
    """Sums over the scored predictions of b sequences, per variant (float64, on the CPU)."""

    nll_per_sequence: Tensor  # [V, b]: sum of -log p(next token) per sequence (a standard error's units)
    kl: Tensor  # [V]: sum of KL(p_variant0 || p_variant) (0 for variant 0)
    count: int  # predictions scored per variant

    @property
    def nll(self) -> Tensor:
        """[V]: sum of -log p(next token) over all b sequences."""
        return self.nll_per_sequence.sum(1)


def variant_losses(model: nn.Module, final: Tensor, ids: Tensor, n_variants: int) -> VariantLosses:
    """Next-token losses of positions 1..T-2 (targets 2..T-1) from final hidden states [V*b, T, d].

    The LM head runs in chunks of positions so that [V, chunk, vocab] float32 logits stay small.
    """
    b, t = ids.shape
    h = final.view(n_variants, b, t, -1)[:, :, 1:t - 1].reshape(n_variants, b * (t - 2), -1)
    targets = ids[:, 2:].reshape(-1).to(h.device)
    logits = logits_fn(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    step = max(1, _LOGIT_ELEMENTS // vocab)
    kl = []  # float32 sums per chunk, added up in float64 on the CPU at the end
    nll = torch.zeros(n_variants, b, device=h.device)  # per sequence: T - 2 terms each, float32 holds
    for lo in range(0, h.shape[1], step):
        logp = torch.log_softmax(logits(h[:, lo:lo + step]), dim=-1)  # [V, R, vocab]
        tgt = targets[lo:lo + step]
        per_pred = -logp.gather(-1, tgt.expand(n_variants, -1)[..., None]).squeeze(-1)  # [V, R]
        seq = torch.arange(lo, lo + per_pred.shape[1], device=h.device) // (t - 2)
        nll.index_add_(1, seq, per_pred)
        # KL(p0 || pj) = sum p0 (log p0 - log pj) per prediction, exactly 0 where log pj equals
        # log p0 bit for bit; clamped at 0 since rounding can make a near-zero KL slightly negative
        # in place on log pj (j >= 1, no longer needed): no [V-1, R, vocab] temporaries
        per_token = logp[1:].neg_().add_(logp[0]).mul_(logp[0].exp()).sum(-1)  # [V-1, R]
        kl.append(F.pad(per_token.clamp_min(0).sum(1), (1, 0)))  # variant 0: exactly 0
    return VariantLosses(nll.cpu().double(), torch.stack(kl).cpu().double().sum(0), b * (t - 2))
