"""The collection pass: stored validation rows, in order, through the dictionary, into collectors.

Rows come from the trainer's loader (unshuffled validation split, position 0 of each sequence
skipped unless the dictionary was trained on it; every chunk checked against its CRC-32), at most
`spec.rows` of them. Each batch is encoded once per *column* (a crosscoder: the joint input, one
column; an SAE: each model it is applied to, one column each) straight to its active codes
(evals/browser/encode.py) and handed to the collectors (evals/browser/collectors.py). Tokens
never go through a model: the token set holds them, and the scanned sequences' tokens (4 bytes a
row) are read once for the context keys and the windows.

Rows are named by their *scan row*: store row - `first_row`, where `first_row` is the first row
of the first validation sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import store as S
from trainer.loader import ActivationLoader

from .collectors import BinnedSamples, FiringCounts, TopContexts
from .encode import encode_column_sparse
from .spec import BrowserSpec
from .windows import context_keys


@dataclass
class ScanInputs:
    """What the pass reads and how each column is encoded."""

    dictionary: object
    arrays: list[S.ActivationArray]
    token_set: S.TokenSet
    columns: list[str]
    column_arrays: list[list[int]]  # per column: indices into `arrays` encoded together
    include_first_position: bool = False
    source_names: list[str] = field(default_factory=list)  # the token set's sources, by index


@dataclass
class Collection:
    """Everything the pass collected, on the CPU, per column."""

    columns: list[str]
    n_latents: int
    context_length: int
    first_row: int  # store row of scan row 0
    tokens: np.ndarray  # [n_seq, ctx] the scanned sequences' tokens
    keys: np.ndarray  # [n_seq * ctx] context key of every scan row (evals/browser/windows.py)
    n_rows: int  # rows scanned
    top_values: np.ndarray  # [columns, latents, k]
    top_rows: np.ndarray  # [columns, latents, k] scan rows, -1: none
    bins: list[dict]  # per column: BinnedSamples.result()
    firing: list[dict]  # per column: FiringCounts.result()
    group_kinds: list[str] = field(default_factory=list)  # "source" | "class", per group
    group_names: list[str] = field(default_factory=list)

    def density(self) -> np.ndarray:
        """[columns, latents] fraction of scanned rows with the latent active."""
        return np.stack([f["fired"] for f in self.firing]) / max(self.n_rows, 1)


def default_batch_rows(n_latents: int) -> int:
    """Rows read and handed to the collectors at once. The encode never holds dense codes of a
    whole batch (evals/browser/encode.py), so this bounds only the active entries: 32M codes
    (rows x latents), i.e. 512 rows of 65,536 latents and 4,096 rows of up to 8,192, keeps them
    under ~700 MB even if every code fired; larger batches gained nothing measurable."""
    return max(256, min(4096, (1 << 25) // max(n_latents, 1)))


def encode_column(dictionary, x: torch.Tensor, which: Sequence[int]) -> torch.Tensor:
    """Codes [b, latents] of one column from a batch x [b, n_arrays, d]."""
    return dictionary.encode(x[:, list(which), :].float())


def active_codes(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active codes of dense f [b, latents] as (latent, value, batch row) entries, row-major
    (the pass itself uses evals/browser/encode.py, which never makes dense codes)."""
    flat = f.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    L = f.shape[1]
    return idx % L, flat.index_select(0, idx).float(), idx // L


def scan_plan(loader: ActivationLoader, limit: int) -> np.ndarray:
    """The store rows the pass reads, in order: the first `limit` rows of the validation stream."""
    return loader.epoch_rows(0)[:limit]


def _groups(tokens: np.ndarray, sources: np.ndarray, source_names: Sequence[str],
            class_lookups: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    ctx = tokens.shape[1]
    groups, kinds, names = {}, [], []
    row_source = np.repeat(np.asarray(sources, np.int64), ctx)
    for i in sorted(set(int(s) for s in np.unique(row_source))):
        name = source_names[i] if i < len(source_names) else f"source {i}"
        groups[f"source/{i}"] = row_source == i
        kinds.append("source")
        names.append(name)
    flat = tokens.reshape(-1)
    for name, lut in class_lookups.items():
        lut = np.asarray(lut, bool)
        ok = (flat >= 0) & (flat < lut.size)
        groups[f"class/{name}"] = np.where(ok, lut[np.clip(flat, 0, lut.size - 1)], False)
        kinds.append("class")
        names.append(name)
    return groups, kinds, names


@torch.no_grad()
def collect(inp: ScanInputs, spec: BrowserSpec, *, class_lookups: Mapping[str, np.ndarray] | None = None,
            device: str | torch.device = "cpu", progress: bool = True) -> Collection:
    """One pass over at most `spec.rows` validation rows; see the module docstring."""
    dictionary, ts = inp.dictionary, inp.token_set
    dictionary.eval()
    device = torch.device(device)
    L, ctx = dictionary.n_latents, ts.context_length
    batch = spec.batch_rows or default_batch_rows(L)
    loader = ActivationLoader(inp.arrays, ts, split="validation", batch_size=batch, shuffle=False,
                              include_first_position=inp.include_first_position, device=device,
                              read_threads=spec.read_threads)
    try:
        plan = scan_plan(loader, spec.rows)
        if plan.size == 0:
            raise ValueError(f"token set {ts.id} has no validation rows to scan")
        first_seq = ts.n_train_sequences
        first_row = first_seq * ctx
        last_seq = int(plan[-1]) // ctx + 1
        tokens = np.asarray(ts.tokens[first_seq:last_seq], dtype=np.int64)
        sources = np.asarray(ts.source[first_seq:last_seq])
        row_keys_np = context_keys(tokens, spec.context_before, spec.context_after)
        keys = torch.from_numpy(row_keys_np).to(device)
        groups, kinds, names = _groups(tokens, sources, inp.source_names, class_lookups or {})
        C = len(inp.columns)
        tops = [TopContexts(L, spec.top_k, device) for _ in range(C)]
        binned = [BinnedSamples(L, spec.hist_bins, spec.samples, seed=spec.seed + c, device=device) for c in range(C)]
        firing = [FiringCounts(L, groups, device) for _ in range(C)]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(plan), unit="tok", unit_scale=True, desc="browser pass", dynamic_ncols=True)
        pos = 0
        for x in loader:
            n = min(x.shape[0], len(plan) - pos)
            scan = torch.from_numpy(plan[pos:pos + n] - first_row).to(device)
            x = x[:n].to(device)
            row_keys = keys[scan]
            for c, which in enumerate(inp.column_arrays):
                lat, val, ri = encode_column_sparse(dictionary, x, which)
                tops[c].update(lat, val, scan[ri], row_keys[ri])
                binned[c].update(lat, val, scan[ri])
                firing[c].update(scan, lat, val, ri)
            pos += n
            if bar is not None:
                bar.update(n)
            if pos >= len(plan):
                break
        if bar is not None:
            bar.close()
    finally:
        loader.close()
    top = [t.result() for t in tops]
    return Collection(columns=list(inp.columns), n_latents=L, context_length=ctx, first_row=first_row,
                      tokens=tokens, keys=row_keys_np, n_rows=pos, top_values=np.stack([t[0] for t in top]),
                      top_rows=np.stack([t[1] for t in top]), bins=[b.result() for b in binned],
                      firing=[f.result() for f in firing], group_kinds=kinds, group_names=names)
