"""Running a model over short token sequences and reading its residual stream at one hook, in the
store's normalized units: the inputs of the absorption and sparse-probing evaluations.

Sequences of different lengths are batched by length (least padding), right-padded with an
attention mask (causal models: a real token never sees the padding after it), and returned in
their original order. The activation is multiplied by the dictionary's scale, exactly as the
cache stored the rows the dictionary was trained on (`pipeline.store.scales`: stored = raw * s).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.config import HookSpec
from pipeline.hooks import capture


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """The ids led by the tokenizer's BOS token when it has one, as every cached sequence is
    (storage_layout.md: token sets), whether or not the tokenizer adds it itself."""
    bos = tokenizer.bos_token_id
    return ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]


def pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(ids [b, T], attention mask [b, T]) of right-padded sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


@torch.inference_mode()
def hook_batches(model, seqs: Sequence[Sequence[int]], hook: HookSpec, scale: float, *, pad: int,
                 batch_size: int, progress: bool = False, desc: str = "forward"
                 ) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """(indices into `seqs`, normalized activations [b, T, d] float32, attention mask [b, T]) per
    batch, batches grouped by length; every index appears once."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    batches = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        ids, mask = padded([seqs[i] for i in idx], pad)
        h = capture(model, ids.to(device), [hook], attention_mask=mask.to(device))[hook]
        yield idx, h.float() * scale, mask.to(h.device)


def activations_at(model, seqs: Sequence[Sequence[int]], positions: Sequence[int], hook: HookSpec,
                   scale: float, *, pad: int, batch_size: int, progress: bool = False,
                   desc: str = "forward") -> Tensor:
    """[n, d] normalized activations of sequence i at token positions[i], in the order of `seqs`."""
    out: Tensor | None = None
    for idx, h, _ in hook_batches(model, seqs, hook, scale, pad=pad, batch_size=batch_size,
                                  progress=progress, desc=desc):
        pos = torch.as_tensor([positions[i] for i in idx], device=h.device)
        rows = h[torch.arange(len(idx), device=h.device), pos].cpu()
        if out is None:
            out = torch.empty(len(seqs), rows.shape[1])
        out[torch.as_tensor(idx)] = rows
    if out is None:
        raise ValueError("no sequences to run")
    return out
