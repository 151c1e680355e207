"""What a dictionary's latents do on the validation tokens, from one streaming pass.

The dictionary is applied (eval mode) to the models' normalized activations at the same
validation tokens. An SAE trained on model A is applied to each model separately (one column per
model: base vs chat, checkpoint vs checkpoint), each in the units the caller chooses (`factors`
of `store_batches`; evals/diff.py feeds other models in A's units); a crosscoder to the joint
input (one column, "joint"). The pass gathers two things at once, so the store is read once:

- activation statistics, per latent and column: firing frequency, mean over all tokens, mean over
  the tokens where it fires; optionally per token class (evals/token_classes.py);
- top-activating contexts: the `contexts_per_latent` largest activations of chosen latents, kept
  with a running top-k, then decoded with `context_tokens` tokens each side.

Position 0 of every sequence (BOS, an attention-sink outlier) is skipped unless the dictionary
was trained with `include_first_position`, so statistics describe the tokens it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from evals.config import TokenClassSpec
from pipeline import store as S

from . import latent_page as P
from .token_classes import TokenTable, token_table

JOINT = "joint"  # the column name of a crosscoder's (joint) activations


@dataclass
class Batch:
    """Rows of the same tokens in every model: row ids, token ids, one [b, d] input per model."""

    rows: Tensor  # [b] int64 row index into the scanned block (seq * context_length + pos)
    token_ids: Tensor  # [b] int64
    inputs: list[Tensor]  # per model: [b, d_model] normalized activations


@dataclass
class ActivationStats:
    """Per column (model, or "joint") and latent: firing frequency, mean, mean when active."""

    columns: list[str]
    n_tokens: int
    freq: np.ndarray  # [n_columns, n_latents] fraction of tokens with f > 0
    mean: np.ndarray  # [n_columns, n_latents] mean of f over all tokens
    mean_active: np.ndarray  # [n_columns, n_latents] mean of f where f > 0 (0 if never active)
    by_class: dict[str, ActivationStats] = field(default_factory=dict)

    def col(self, name: str) -> int:
        return self.columns.index(name)


@dataclass
class TopActivations:
    """The k largest activations of each tracked latent: values and rows, descending (<= 0: none)."""

    latents: np.ndarray  # [l]
    values: np.ndarray  # [l, k]
    rows: np.ndarray  # [l, k] (-1 where fewer than k tokens were seen)

    def of(self, latent: int) -> list[tuple[float, int]]:
        """(value, row) pairs of one latent with a positive activation, largest first."""
        idx = np.flatnonzero(self.latents == latent)
        if idx.size == 0:
            raise KeyError(f"latent {latent} was not tracked")
        v, r = self.values[idx[0]], self.rows[idx[0]]
        return [(float(a), int(b)) for a, b in zip(v, r) if a > 0 and b >= 0]


class _Sums:
    def __init__(self, n_cols: int, n_latents: int, device):
        self.total = torch.zeros(n_cols, n_latents, dtype=torch.float64, device=device)
        self.active = torch.zeros(n_cols, n_latents, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, c: int, f: Tensor, weight: Tensor | None = None) -> None:
        if weight is None:
            self.total[c] += f.sum(0, dtype=torch.float64)
            self.active[c] += (f > 0).sum(0, dtype=torch.float64)
        else:  # a 0/1 row mask as a matmul: no copy of the selected rows
            self.total[c] += (weight @ f).double()
            self.active[c] += (weight @ (f > 0).to(f.dtype)).double()

    def stats(self, columns: list[str]) -> ActivationStats:
        total, active = self.total.cpu().numpy(), self.active.cpu().numpy()
        n = max(self.n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_active = np.where(active > 0, total / np.maximum(active, 1), 0.0)
        return ActivationStats(list(columns), self.n, active / n, total / n, mean_active)


class _TopK:
    """Running top-k over rows for a set of latents (None: all), merged batch by batch."""

    def __init__(self, latents: Sequence[int] | None, n_latents: int, k: int, device):
        self.index = None if latents is None else torch.as_tensor(list(latents), dtype=torch.long,
                                                                  device=device)
        n_tracked = n_latents if latents is None else len(self.index)
        self.latents = np.arange(n_latents) if latents is None else np.asarray(list(latents), np.int64)
        self.k = k
        self.values = torch.full((k, n_tracked), -math.inf, device=device)
        self.rows = torch.full((k, n_tracked), -1, dtype=torch.long, device=device)

    def update(self, f: Tensor, rows: Tensor) -> None:
        v = f if self.index is None else f.index_select(1, self.index)
        if v.shape[1] == 0 or v.shape[0] == 0:
            return
        tv, ti = v.topk(min(self.k, v.shape[0]), dim=0)
        vals = torch.cat([self.values, tv.float()])
        rws = torch.cat([self.rows, rows[ti]])
        self.values, pick = vals.topk(self.k, dim=0)
        self.rows = rws.gather(0, pick)

    def result(self) -> TopActivations:
        return TopActivations(self.latents, self.values.T.cpu().numpy(), self.rows.T.cpu().numpy())


def encode_columns(dictionary, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Codes per column: an SAE encodes each model's input alone, a crosscoder all of them jointly."""
    if dictionary.n_models == 1:
        return [dictionary.encode(x[:, None, :]) for x in inputs]
    if len(inputs) != dictionary.n_models:
        raise ValueError(f"a {dictionary.n_models}-model crosscoder needs {dictionary.n_models} inputs, "
                         f"got {len(inputs)}")
    return [dictionary.encode(torch.stack(list(inputs), dim=1))]


@dataclass
class ScanResult:
    stats: ActivationStats
    top: dict[str, TopActivations]  # per column


@torch.no_grad()
def scan_activations(dictionary, batches: Iterable[Batch], *, columns: Sequence[str],
                     class_lookups: Mapping[str, np.ndarray] | None = None, top_k: int = 0,
                     track: Mapping[str, Sequence[int] | None] | None = None,
                     device: str | torch.device = "cpu") -> ScanResult:
    """Statistics of every latent and the running top-k of the tracked latents, in one pass.

    `columns` names the code columns (`encode_columns`: one per model for an SAE, one for a
    crosscoder). `class_lookups` maps a token class to a [vocab] bool lookup (TokenTable.lookup).
    `track` maps a column to the latents whose top-k rows to keep (None: all latents); columns
    not named are not tracked. The dictionary is put in eval mode.
    """
    dictionary.eval()
    columns = list(columns)
    m = dictionary.n_latents
    lookups = {name: torch.as_tensor(lut, dtype=torch.bool, device=device)
               for name, lut in (class_lookups or {}).items()}
    sums = _Sums(len(columns), m, device)
    class_sums = {name: _Sums(len(columns), m, device) for name in lookups}
    trackers = {c: _TopK(lat, m, top_k, device) for c, lat in (track or {}).items() if top_k > 0}
    for batch in batches:
        rows = batch.rows.to(device)
        ids = batch.token_ids.to(device)
        codes = encode_columns(dictionary, [x.to(device, torch.float32) for x in batch.inputs])
        if len(codes) != len(columns):
            raise ValueError(f"{len(codes)} code columns but {len(columns)} column names")
        sums.n += rows.shape[0]
        weights = {}
        for name, lut in lookups.items():
            mask = lut[ids.clamp(0, lut.numel() - 1)] & (ids >= 0) & (ids < lut.numel())
            weights[name] = mask.float()
            class_sums[name].n += int(mask.sum())
        for c, (name, f) in enumerate(zip(columns, codes)):
            sums.add(c, f)
            for cls, w in weights.items():
                class_sums[cls].add(c, f, w)
            if name in trackers:
                trackers[name].update(f, rows)
    stats = sums.stats(columns)
    stats.by_class = {name: s.stats(columns) for name, s in class_sums.items()}
    return ScanResult(stats, {c: t.result() for c, t in trackers.items()})


def tensor_batches(inputs: Sequence[Tensor], token_ids: Tensor | None = None, *,
                   batch_rows: int = 4096) -> Iterator[Batch]:
    """Batches over in-memory activations [N, d] (one per model) and their token ids [N]."""
    n = inputs[0].shape[0]
    if any(x.shape[0] != n for x in inputs):
        raise ValueError("every model's activations need the same number of rows")
    ids = torch.zeros(n, dtype=torch.long) if token_ids is None else torch.as_tensor(token_ids).long().reshape(-1)
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        yield Batch(torch.arange(lo, hi), ids[lo:hi], [x[lo:hi] for x in inputs])


def activation_stats(dictionary, activations: Mapping[str, Tensor], *, token_ids: Tensor | None = None,
                     token_classes: Sequence[TokenClassSpec] = (), tokenizer=None,
                     batch_rows: int = 4096, device: str | torch.device = "cpu") -> ActivationStats:
    """Statistics of a dictionary on in-memory normalized activations {model name: [N, d_model]}.

    An SAE gives one column per model; a crosscoder one "joint" column (inputs in mapping order).
    Token classes need `token_ids` [N] and the `tokenizer` (or a TokenTable).
    """
    names = list(activations)
    columns = names if dictionary.n_models == 1 else [JOINT]
    lookups = {}
    if token_classes:
        if token_ids is None or tokenizer is None:
            raise ValueError("token classes need token_ids and a tokenizer")
        table = token_table(tokenizer)
        lookups = {c.name: table.lookup(c) for c in token_classes}
    batches = tensor_batches([activations[n] for n in names], token_ids, batch_rows=batch_rows)
    return scan_activations(dictionary, batches, columns=columns, class_lookups=lookups,
                            device=device).stats


def store_batches(arrays: Sequence[S.ActivationArray], tokens: np.ndarray, first_row: int, *,
                  batch_rows: int, include_first_position: bool = False, progress: bool = False,
                  factors: Sequence[float] | None = None) -> Iterator[Batch]:
    """Batches of the same rows of every array: the sequences `tokens` [n_seq, ctx] that start at
    store row `first_row`. Rows in the batches are relative to that block. `factors` (one per
    array, default 1) multiply the stored rows: a dictionary of model A reads model B's rows in A's
    units with s_A / s_B (evals/diff.py)."""
    factors = [1.0] * len(arrays) if factors is None else [float(f) for f in factors]
    if len(factors) != len(arrays):
        raise ValueError(f"{len(factors)} factors for {len(arrays)} arrays")
    n_seq, ctx = tokens.shape
    n = n_seq * ctx
    flat = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="tok", desc="scan", dynamic_ncols=True)
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        rows = torch.arange(lo, hi)
        xs = [S.read_rows(a, first_row + lo, first_row + hi).float() for a in arrays]
        xs = [x if f == 1.0 else x * f for x, f in zip(xs, factors)]
        if not include_first_position:
            keep = rows % ctx != 0
            rows, xs = rows[keep], [x[keep] for x in xs]
        yield Batch(rows, flat[rows], xs)
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()


def rank_increase(stats: ActivationStats, a: str, b: str, *, metric: str = "freq", top: int = 50,
                  decrease: bool = False) -> np.ndarray:
    """Latents by the increase of `metric` (freq, mean or mean_active) from column a to column b,
    largest first (`decrease`: largest decrease first). Only latents active on a or b."""
    values = getattr(stats, metric)
    delta = values[stats.col(b)] - values[stats.col(a)]
    if decrease:
        delta = -delta
    alive = np.flatnonzero((stats.freq[stats.col(a)] > 0) | (stats.freq[stats.col(b)] > 0))
    order = np.argsort(-delta[alive], kind="stable")
    return alive[order][:top]


def context_snippets(top: TopActivations, latents: Iterable[int], tokens: np.ndarray, table: TokenTable,
                     *, context_tokens: int, seq_offset: int = 0, row_offset: int = 0
                     ) -> dict[int, list[P.Snippet]]:
    """Decoded snippets of the top activations: `context_tokens` tokens each side, within the
    sequence. `tokens` is the scanned block [n_seq, ctx]; offsets map it back to the token set and
    the store rows."""
    ctx = tokens.shape[1]
    out = {}
    for latent in latents:
        snips = []
        for value, row in top.of(int(latent)):
            seq, pos = divmod(row, ctx)
            ids = tokens[seq]
            lo, hi = max(0, pos - context_tokens), min(ctx, pos + context_tokens + 1)
            snips.append(P.Snippet(value=value, token=table.decode(int(ids[pos])),
                                   left=[table.decode(int(t)) for t in ids[lo:pos]],
                                   right=[table.decode(int(t)) for t in ids[pos + 1:hi]],
                                   seq=seq + seq_offset, pos=pos, row=row + row_offset))
        out[int(latent)] = snips
    return out
