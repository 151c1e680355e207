"""Resampling dead latents of L1 dictionaries, as Anthropic's "Towards Monosemanticity" (2023,
appendix "Neuron resampling") does it.

At a resampling step, for each dictionary with dead latents:

1. the loss of each input (its squared reconstruction error, summed over models and dimensions)
   is computed over a sample of `resample_sample_tokens` training-split tokens, streamed in
   batches from a loader of its own (the training batches' order is untouched);
2. one input per dead latent is drawn WITHOUT replacement, with probability proportional to the
   square of its loss. Drawn as the largest Gumbel-perturbed log-weights over the stream
   (log w + Gumbel noise, top n: exactly successive sampling without replacement), so only the n
   inputs picked so far are kept: memory is a batch plus n inputs, whatever the sample's size;
3. the latent's decoder row becomes the input normalized (each model's slice on its own, as the
   decoder norms are per model), its encoder row the normalized input times 0.2 x the mean
   encoder norm of the alive latents (per model), its encoder bias 0, and Adam's moments of all
   three are zeroed for that latent only. If fewer inputs have a nonzero loss than latents are
   dead, only that many latents (the lowest-numbered) are resampled.

The paper's decoder rows have unit norm; ours (decoder-norm-weighted L1, no constraint) do not,
and only the product of a latent's code and decoder norm matters to both the reconstruction and
the penalty. So "normalized" means: at the mean norm of that model's alive decoder rows (unit,
where the rows are unit), which keeps the paper's ratio of a resampled latent's initial strength to
the alive ones' (0.2); at unit norm it would be 1 / (that mean) times stronger.

Which latents a resampling step re-initializes (`resample_candidates`): by default the dead ones
(silent for `dead_after_tokens`, the trainer's definition everywhere). With `resample_window_steps`
= W, those silent within the window instead: the latents that fired in none of the last W training
steps, counted back from the resampling step. A resampled (or merged-away) latent's window starts
afresh, so it is a candidate again only after W more silent steps, and none is a candidate before
W steps have been trained. This is the paper's rule ("neurons which have not fired in any of the
previous 12,500 training steps"), with its own window apart from the dead-latent definition that
the logs, AuxK and the evaluations share. The window is read off the trainer's per-latent counters
(tokens since the latent last fired, restarted when it fires or is resampled, checkpointed with the
weights): with a fixed batch of B tokens, silent for the last W steps is exactly `counter >= W * B`,
so no second set of counters is kept and a resumed run sees the same windows.

Everything random is seeded by the step (`derived_seed`), so a resumed run resamples identically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

EPS = 1e-8
ENCODER_SCALE = 0.2  # the paper's: a resampled encoder row at 0.2 x the alive rows' mean norm


def derived_seed(*parts: object) -> int:
    """A 63-bit seed that is a stable function of `parts` (unlike `hash`, the same in every
    process and Python version), so resampling is reproducible across a resume."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resample_candidates(tokens_since_fired: Tensor, dead_after_tokens: int, window_steps: int,
                        batch_size: int) -> Tensor:
    """[n_latents] bool: the latents a resampling step re-initializes, from the trainer's counters
    (tokens since each latent last fired): silent for the last `window_steps` steps of
    `batch_size` tokens when a window is set (> 0), else dead (silent for `dead_after_tokens`)."""
    if window_steps > 0:
        return tokens_since_fired >= window_steps * batch_size
    return tokens_since_fired >= dead_after_tokens


@torch.no_grad()
def input_losses(model, x: Tensor) -> Tensor:
    """[batch]: the squared reconstruction error of each input, summed over models and dimensions."""
    x_hat, _ = model(x)
    return (x - x_hat).pow(2).sum(dim=(1, 2))


class LossWeightedPicker:
    """Keeps `n` inputs of a stream drawn without replacement with probability proportional to
    loss^2, by Gumbel top-n: key = 2 log(loss) + G, G ~ Gumbel(0, 1) drawn from `generator` in
    stream order. Inputs with zero loss are never picked. The n picks live in fixed slots, and an
    input displacing one is the only copy made, so a batch costs O(batch), not O(n)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.generator = generator
        self.keys = torch.full((n,), -torch.inf, dtype=torch.float64)
        self.positions = torch.full((n,), -1, dtype=torch.long)  # each slot's index in the stream
        self.slots: Tensor | None = None  # [n, n_models, d], allocated by the first batch
        self.seen = 0

    def offer(self, x: Tensor, losses: Tensor) -> None:
        """The next inputs of the stream, x [batch, n_models, d], and their losses [batch]."""
        count = x.shape[0]
        u = torch.rand(count, generator=self.generator, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
        losses = losses.detach().to("cpu", torch.float64)
        keys = torch.where(losses > 0, 2 * losses.clamp_min(1e-300).log() + gumbel, -torch.inf)
        first = self.seen
        self.seen += count
        if self.n == 0:
            return
        if self.slots is None:
            self.slots = x.new_zeros((self.n, *x.shape[1:]))
        kept = torch.zeros(self.n + count, dtype=torch.bool)
        kept[torch.cat([self.keys, keys]).topk(self.n).indices] = True
        freed = (~kept[: self.n]).nonzero().flatten()
        incoming = kept[self.n:].nonzero().flatten()  # as many as were freed
        self.keys[freed] = keys[incoming]
        self.positions[freed] = incoming + first
        self.slots[freed.to(x.device)] = x[incoming.to(x.device)]

    def picked(self) -> tuple[Tensor, Tensor]:
        """(the picked inputs [<= n, n_models, d], their positions in the stream), highest key
        first: the order in which successive draws would have picked them."""
        order = self.keys.argsort(descending=True, stable=True)
        order = order[torch.isfinite(self.keys[order])]
        if self.slots is None:
            return torch.empty(0), self.positions[order]
        return self.slots[order.to(self.slots.device)], self.positions[order]


@dataclass
class Due:
    """One dictionary resampling now: its optimizer, dead mask, sample size and random draws."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    dead: Tensor  # [n_latents] bool
    sample_tokens: int
    generator: torch.Generator


def resample(due: list[Due], batches: Iterable[Tensor], limit: int | None = None,
             progress: bool = True) -> list[Tensor]:
    """Stream `batches` once for every dictionary in `due` (each reads its first `sample_tokens`
    inputs, at most `limit`), then resample each one's dead latents; returns the indices of the
    latents resampled, per dictionary."""
    caps = [d.sample_tokens if limit is None else min(d.sample_tokens, limit) for d in due]
    pickers = [LossWeightedPicker(int(d.dead.sum()), d.generator) for d in due]
    total, seen = max(caps), 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc="resample: losses", leave=False,
              disable=not progress, dynamic_ncols=True) as bar:
        for x in batches:
            x = x.float()[: total - seen]
            for d, cap, picker in zip(due, caps, pickers):
                if cap > seen:
                    part = x[: cap - seen]
                    picker.offer(part, input_losses(d.model, part))
            seen += x.shape[0]
            bar.update(x.shape[0])
            if seen >= total:
                break
    return [resample_dead_(d.model, d.opt, d.dead, p.picked()[0]) for d, p in zip(due, pickers)]


@torch.no_grad()
def resample_dead_(model, opt: torch.optim.Optimizer, dead: Tensor, inputs: Tensor,
                   encoder_scale: float = ENCODER_SCALE) -> Tensor:
    """Point dead latents at `inputs` [n, n_models, d] (one each, in index order; n may be fewer
    than the dead latents) and reset their Adam moments; returns the latents resampled."""
    idx = dead.nonzero().flatten()
    n = min(idx.numel(), inputs.shape[0])
    idx = idx[:n]
    if n == 0:
        return idx
    x = inputs[:n].to(model.W_dec.device, model.W_dec.dtype)
    direction = x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)  # [n, n_models, d], per model
    alive = ~dead.to(model.W_dec.device)
    if not alive.any():
        alive = torch.ones_like(alive)  # nothing alive to match: the mean over all latents
    dec_norm = model.W_dec.norm(dim=-1)[alive].mean(0)  # [n_models]
    enc_norm = model.W_enc.norm(dim=1)[:, alive].mean(1)  # [n_models]
    model.W_dec[idx] = direction * dec_norm[None, :, None]
    model.W_enc[:, :, idx] = (direction * (encoder_scale * enc_norm)[None, :, None]).permute(1, 2, 0)
    model.b_enc[idx] = 0.0
    for p, latent_dim in ((model.W_enc, 2), (model.W_dec, 0), (model.b_enc, 0)):
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name].index_fill_(latent_dim, idx, 0.0)
    model.constrain_()  # a resampled shared or dedicated latent back on its partition (and unit norm)
    return idx
