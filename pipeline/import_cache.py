"""`mdiff import-cache`: activation caches written by other toolkits, as ordinary arrays of our store.

Foreign layouts read (streaming: one of our shards at a time, nothing loaded whole):

* dictionary_learning's `ActivationCache`: a folder per submodule holding `config.json`
  ({"shard_count", "total_size", "d_model", "shuffle_shards", "store_tokens", ...}) and per shard
  `shard_<i>.memmap`, a raw [rows, d_model] array whose shape and dtype are in `shard_<i>.meta`
  ({"shape", "dtype"}; float32 when there is no dtype, bfloat16 stored as its 16 bits). When
  collected with `store_tokens`, the parent folder holds `tokens.pt` (every stored token, flat)
  and `sequence_ranges.pt` (each sequence's first row, then the total).
* SAELens' cached activations: a `datasets` folder (save_to_disk) with one Array2D column
  [context_size, d_in] per hook name (the TransformerLens name) and, in recent versions,
  `token_ids` [context_size]; row i is sequence i.

What is written: a token set and one activation array, exactly as storage_layout.md specifies, so
the loader and `mdiff status` / `verify` treat them like cached ones. Rows are normalized by our
own scale (mean norm sqrt(d_model) over the first training rows, position 0 excluded). Rows keep
the foreign order; sequences of equal length become the token set's sequences. Without fixed-
length sequences (shuffled rows, or sequences of varying length) every row is its own
"sequence" of length 1: train on it with `include_first_position`. Without tokens the token set
holds -1 and records that splicing (which runs the models on the tokens) is unavailable.

Resumable like the cache job: each shard is written whole and then recorded; a rerun skips
recorded shards and ends bit-identical to an uninterrupted import.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import hook_names
from . import models as M
from . import store as S
from .records import canonical_hash, canonical_json

FORMATS = ("dictionary_learning", "saelens")
_DL_HOOK = re.compile(r"resid_(pre|post)_layer_?(\d+)")
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16}
_BLOCK_ROWS = 1 << 16  # rows per read while hashing tokens or estimating the scale


class CacheImportError(S.StoreError):
    """A foreign cache that cannot be imported as asked (the message says why and what to do)."""


@dataclass
class ForeignCache:
    """A foreign cache opened for reading rows [lo, hi) and, when it has them, their tokens."""

    format: str
    path: str
    n_rows: int
    d_model: int
    context_length: int  # tokens per sequence; 1 when the rows carry no sequence structure
    dtype: str
    read_rows: Callable[[int, int], np.ndarray]  # float32 [hi - lo, d_model]
    read_tokens: Callable[[int, int], np.ndarray] | None  # int32 [sequences, context_length]
    fingerprint: str  # sha256 over the cache's metadata files and shard shapes
    hook_label: str | None = None  # our hook, when the cache's naming says which
    model_name: str | None = None
    sequence_starts: np.ndarray | None = None  # first rows of sequences when context_length is 1
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass
class ImportResult:
    tokenset_id: str
    array_path: str
    scale: float
    context_length: int
    tokens: bool
    shards_written: int
    n_shards: int
    notes: list[str]


def _as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # stored as the 16 high bits of a float32
        return (np.ascontiguousarray(a).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, dtype=np.float32)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _dl_folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    subs = sorted(p for p in path.iterdir()
                  if (p / "config.json").is_file() and (p / "shard_0.meta").is_file())
    if len(subs) != 1:
        listed = ", ".join(p.name for p in subs) or "none"
        raise CacheImportError(f"{path}: point at one submodule folder of the dictionary_learning cache "
                               f"(folders with config.json and shard_0.meta: {listed})")
    return subs[0]


def open_dictionary_learning(path: str | Path) -> ForeignCache:
    folder = _dl_folder(Path(path))
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shards, metas = [], []
    for i in range(int(cfg["shard_count"])):
        meta = json.loads((folder / f"shard_{i}.meta").read_text(encoding="utf-8"))
        dtype = meta.get("dtype", "float32")
        if dtype not in _NP_DTYPES:
            raise CacheImportError(f"{folder}/shard_{i}.meta: dtype {dtype!r} is not an activation dtype")
        shape = tuple(int(v) for v in meta["shape"])
        file = folder / f"shard_{i}.memmap"
        expected = math.prod(shape) * np.dtype(_NP_DTYPES[dtype]).itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise CacheImportError(f"{file}: missing or not {expected:,} bytes ({shape} {dtype}): the cache "
                                   "is incomplete; finish collecting it first")
        shards.append((file, shape, dtype))
        metas.append(meta)
    if not shards:
        raise CacheImportError(f"{folder}: config.json lists no shards")
    widths = {s[1][1] for s in shards}
    if len(widths) != 1:
        raise CacheImportError(f"{folder}: shards differ in width {sorted(widths)}")
    bounds = np.cumsum([0] + [s[1][0] for s in shards])
    n_rows, d = int(bounds[-1]), widths.pop()
    if cfg.get("total_size") not in (None, n_rows):
        raise CacheImportError(f"{folder}: config.json says total_size {cfg['total_size']:,} but its "
                               f"{len(shards)} shards hold {n_rows:,} rows")
    mapped: dict[int, np.memmap] = {}

    def read_rows(lo: int, hi: int) -> np.ndarray:
        out = []
        for i in range(int(np.searchsorted(bounds, lo, "right")) - 1, len(shards)):
            if bounds[i] >= hi:
                break
            file, shape, dtype = shards[i]
            if i not in mapped:
                mapped[i] = np.memmap(file, dtype=_NP_DTYPES[dtype], mode="r", shape=shape)
            a, b = max(lo, bounds[i]) - bounds[i], min(hi, bounds[i + 1]) - bounds[i]
            out.append(_as_float32(mapped[i][a:b], dtype))
        return np.concatenate(out)

    cache = ForeignCache("dictionary_learning", str(folder), n_rows, d, 1, shards[0][2], read_rows,
                         None, _digest(canonical_json([cfg, metas], compact=False).encode()),
                         metadata={"config": cfg})
    match = _DL_HOOK.search(folder.name)
    if match:
        cache.hook_label = f"layer{match.group(2)}.resid_{match.group(1)}"
    tokens_file, ranges_file = folder.parent / "tokens.pt", folder.parent / "sequence_ranges.pt"
    if cfg.get("shuffle_shards"):
        cache.notes.append("rows were shuffled within shards: no sequence structure")
        return cache
    tokens = None
    if cfg.get("store_tokens") and tokens_file.is_file():
        tokens = torch.load(tokens_file, map_location="cpu", weights_only=True, mmap=True).reshape(-1)
        if tokens.numel() != n_rows:
            raise CacheImportError(f"{tokens_file}: {tokens.numel():,} tokens for {n_rows:,} rows")
    starts = None
    if ranges_file.is_file():
        ranges = torch.load(ranges_file, map_location="cpu", weights_only=True).numpy().astype(np.int64)
        if ranges[0] != 0 or ranges[-1] != n_rows or np.any(np.diff(ranges) <= 0):
            raise CacheImportError(f"{ranges_file}: not increasing sequence starts from 0 to {n_rows:,}")
        lengths = np.unique(np.diff(ranges))
        if len(lengths) == 1 and lengths[0] >= 2:
            cache.context_length = int(lengths[0])
        else:
            starts = ranges[:-1]
            cache.notes.append(f"sequences of {len(lengths)} different lengths: every row is its own "
                               "sequence of length 1 (sequence starts kept out of the scale estimate)")
    else:
        cache.notes.append("no sequence_ranges.pt: sequence boundaries unknown, every row is its own "
                           "sequence of length 1")
    cache.sequence_starts = starts
    if tokens is not None:
        ctx = cache.context_length
        cache.read_tokens = lambda lo, hi: tokens[lo * ctx:hi * ctx].numpy().astype(np.int32).reshape(-1, ctx)
    return cache


def open_saelens(path: str | Path, column: str | None = None) -> ForeignCache:
    import datasets

    path = Path(path)
    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.Dataset):
        raise CacheImportError(f"{path}: a DatasetDict; point at one split's folder")
    hooks = [c for c, f in ds.features.items() if isinstance(f, datasets.Array2D)]
    if column is None and len(hooks) == 1:
        column = hooks[0]
    if column not in hooks:
        raise CacheImportError(f"{path}: choose the activation column (hook name) to import with --column: "
                               f"{', '.join(hooks) or 'none found'}")
    ctx, d = ds.features[column].shape
    acts = ds.with_format("numpy", columns=[column])
    dtype = ds.features[column].dtype

    def read_rows(lo: int, hi: int) -> np.ndarray:
        first, last = lo // ctx, -(-hi // ctx)
        block = acts[first:last][column].reshape(-1, d)
        return _as_float32(block[lo - first * ctx:hi - first * ctx], dtype)

    tok = ds.with_format("numpy", columns=["token_ids"]) if "token_ids" in ds.column_names else None

    def read_tokens(lo: int, hi: int) -> np.ndarray:
        return np.asarray(tok[lo:hi]["token_ids"], dtype=np.int32).reshape(-1, ctx)
    files = [p.read_bytes() for p in (path / "dataset_info.json", path / "state.json") if p.is_file()]
    return ForeignCache("saelens", str(path), len(ds) * ctx, d, ctx, dtype, read_rows,
                        read_tokens if tok is not None else None,
                        _digest(column.encode(), str(len(ds)).encode(), *files),
                        hook_label=hook_names.from_transformerlens(column),
                        metadata={"column": column, "features": ds.features.to_dict(),
                                  "n_sequences": len(ds)})


def open_cache(path: str | Path, format: str = "auto", column: str | None = None) -> ForeignCache:
    path = Path(path)
    if format == "auto":
        if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            format = "saelens"
        elif path.is_dir():
            format = "dictionary_learning"
        else:
            raise CacheImportError(f"{path}: not a folder; point at a dictionary_learning cache folder or "
                                   "a SAELens cached-activations folder")
    if format == "saelens":
        return open_saelens(path, column)
    if format == "dictionary_learning":
        return open_dictionary_learning(path)
    raise CacheImportError(f"unknown cache format {format!r}; use auto or one of {', '.join(FORMATS)}")


def _token_blocks(cache: ForeignCache, n_seq: int):
    step = max(1, _BLOCK_ROWS // cache.context_length)
    for lo in range(0, n_seq, step):
        hi = min(lo + step, n_seq)
        toks = (cache.read_tokens(lo, hi) if cache.read_tokens is not None
                else np.full((hi - lo, cache.context_length), -1, np.int32))
        yield toks, np.zeros(hi - lo, np.uint8)


def tokenset_id_for(cache: ForeignCache, n_seq: int, validation_fraction: float) -> str:
    """Imported token sets are named by their tokens (or, without tokens, by the cache itself)."""
    if cache.read_tokens is not None:
        h = hashlib.sha256()
        for toks, _ in _token_blocks(cache, n_seq):
            h.update(np.ascontiguousarray(toks, dtype="<i4").tobytes())
        content = {"tokens_sha256": h.hexdigest()}
    else:
        content = {"cache": cache.fingerprint}
    payload = {"format": "imported", **content, "context_length": cache.context_length,
               "n_sequences": n_seq, "validation_fraction": float(validation_fraction)}
    return "ts-" + canonical_hash(payload, compact=True)[:16]


def _check_attached(root: S.StoreRoot, ts_id: str, cache: ForeignCache, n_seq: int) -> list[str]:
    """An existing token set the cache joins: same shape, and the same tokens when both have them."""
    ts = S.open_token_set(root, ts_id)
    if (ts.n_sequences, ts.context_length) != (n_seq, cache.context_length):
        raise CacheImportError(f"token set {ts_id} has {ts.n_sequences:,} sequences of {ts.context_length}; "
                               f"this cache has {n_seq:,} of {cache.context_length}")
    if cache.read_tokens is None or not ts.attrs.get("tokens_available", True):
        return [f"joined token set {ts_id} by row order: the tokens cannot be compared (absent on one side)"]
    for lo, (toks, _) in zip(range(0, n_seq, max(1, _BLOCK_ROWS // cache.context_length)),
                             _token_blocks(cache, n_seq), strict=True):
        if not np.array_equal(ts.tokens[lo:lo + len(toks)], toks):
            raise CacheImportError(f"token set {ts_id} holds other tokens than this cache (first differing "
                                   f"block at sequence {lo}): the rows would not be the same tokens")
    return [f"joined token set {ts_id}: tokens checked equal"]


def estimate_scale(cache: ForeignCache, n_train_rows: int, sample_rows: int) -> float:
    """s with mean ||s x|| = sqrt(d_model) over the first training rows, sequence starts excluded."""
    ctx = cache.context_length
    n = min(n_train_rows, max(ctx, -(-sample_rows // ctx) * ctx))
    total, count = 0.0, 0
    for lo in range(0, n, _BLOCK_ROWS):
        hi = min(lo + _BLOCK_ROWS, n)
        norms = torch.from_numpy(cache.read_rows(lo, hi)).norm(dim=-1).double()
        rows = np.arange(lo, hi)
        keep = rows % ctx != 0 if ctx >= 2 else np.ones(hi - lo, bool)
        if cache.sequence_starts is not None:
            keep &= ~np.isin(rows, cache.sequence_starts)
        total += float(norms[torch.from_numpy(keep)].sum())
        count += int(keep.sum())
    return S.normalization_scale(cache.d_model, total / max(count, 1), lambda mean: CacheImportError(
        f"{cache.path}: mean activation norm {mean}: non-finite or zero activations"))


def _layout(cache: ForeignCache, chunk_rows: int, shard_rows: int) -> tuple[int, int]:
    """Shards of whole chunks and whole sequences, as the config requires of cached arrays."""
    step = math.lcm(chunk_rows, cache.context_length)
    return chunk_rows, max(step, -(-shard_rows // step) * step)


def _command(source, store, model, label, cache, column, validation_fraction, ts_id,
             storage_dtype, chunk_rows, shard_rows) -> str:
    """The command that finishes this import if it is interrupted: every choice it was run with,
    spelled out, so the rerun lands in the same token set and array."""
    args = ["mdiff", "import-cache", str(source), "--store", str(store), "--model", model,
            "--hook", label, "--format", cache.format, "--validation-fraction",
            repr(validation_fraction), "--tokenset", ts_id, "--storage-dtype", storage_dtype,
            "--chunk-rows", str(chunk_rows), "--shard-rows", str(shard_rows)]
    if column:
        args += ["--column", column]
    return shlex.join(args)


def import_cache(source: str | Path, store: str, *, model: str | None = None, hook: str | None = None,
                 format: str = "auto", column: str | None = None, validation_fraction: float = 0.05,
                 tokenset: str | None = None, storage_dtype: str = "bfloat16", chunk_rows: int = 4096,
                 shard_rows: int = 65536, scale_sample_tokens: int = 262_144,
                 storage_options: dict | None = None, progress: bool = True, log=print) -> ImportResult:
    """Import one foreign cache (one model, one hook) into the store at `store`; resumable."""
    cache = open_cache(source, format, column)
    label = hook or cache.hook_label
    hook_spec = hook_names.parse_label(label)
    if hook_spec is None:
        raise CacheImportError(f"{source}: name the hook these activations are, as layer<L>.resid_pre or "
                               f"layer<L>.resid_post, with --hook (got {label!r})")
    model = model or cache.model_name
    if not model:
        raise CacheImportError(f"{source}: the cache does not name its model; name it with --model")
    if storage_dtype not in ("bfloat16", "float32"):
        raise CacheImportError(f"storage dtype {storage_dtype!r}: use bfloat16 or float32 (never float16)")
    ctx = cache.context_length
    n_seq = cache.n_rows // ctx
    n_val = max(1, round(n_seq * validation_fraction)) if validation_fraction > 0 else 0
    if n_val >= n_seq:
        raise CacheImportError(f"validation fraction {validation_fraction} leaves no training sequences "
                               f"({n_val} of {n_seq})")
    root = S.StoreRoot(store, storage_options)
    root.ensure_format(create=True)
    notes = list(cache.notes)
    has_tokens = cache.read_tokens is not None
    if tokenset:
        if not S.token_set_complete(root, tokenset):
            raise CacheImportError(f"--tokenset {tokenset}: no complete token set of that id in {root.url}")
        ts_id = tokenset
        notes += _check_attached(root, ts_id, cache, n_seq)
    else:
        ts_id = tokenset_id_for(cache, n_seq, validation_fraction)
    splicing = ("available" if has_tokens and ctx >= 3 else
                "unavailable: " + ("the cache holds no tokens" if not has_tokens else
                                   "no fixed-length sequences to run the models on"))
    origin = {"format": cache.format, "path": cache.path, "fingerprint": cache.fingerprint,
              "dtype": cache.dtype, "metadata": cache.metadata, "notes": notes}
    if not S.token_set_complete(root, ts_id):
        S.write_token_set(root, ts_id, n_seq, ctx, _token_blocks(cache, n_seq), {
            "spec": {"validation_fraction": validation_fraction}, "sources": [origin],
            "source_counts": [n_seq], "tokenizer_fingerprint": None, "tokenizer_from": None,
            "context_length": ctx, "n_sequences": n_seq, "n_train_sequences": n_seq - n_val,
            "n_validation_sequences": n_val, "bos_token_id": None, "eos_token_id": None,
            "tokens_available": has_tokens, "splicing": splicing, "imported_from": origin})
    identity = {"source": "imported", "name": model, "format": cache.format, "cache": cache.fingerprint}
    key = M.model_key(identity)
    path = S.activation_path(ts_id, key, label)
    chunk_rows, shard_rows = _layout(cache, chunk_rows, shard_rows)
    structure = dict(n_rows=n_seq * ctx, d_model=cache.d_model, chunk_rows=chunk_rows,
                     shard_rows=shard_rows, storage_dtype=storage_dtype, compression="none")
    if not S.array_exists(root, path):
        scale = estimate_scale(cache, (n_seq - n_val) * ctx, scale_sample_tokens)
        S.create_activation_array(root, path, **structure, attrs={
            "scale": scale, "normalization": S.NORMALIZATION_IMPORTED, "model": identity,
            "model_key": key, "model_name": model, "architecture": None,
            "hook": {"layer": hook_spec.layer, "site": hook_spec.site, "label": label}, "tokenset_id": ts_id,
            "context_length": ctx, "produced_by": {"config": None, "experiment": None,
                                                   "command": _command(source, store, model, label, cache, column,
                                                                       validation_fraction, ts_id,
                                                                       storage_dtype, chunk_rows,
                                                                       shard_rows)},
            "imported_from": {**origin, "model_name": model}})
    arr = S.open_activation_array(root, path)
    arr.check_structure(structure)
    done = arr.done_shards()
    todo = [s for s in range(arr.n_shards) if s not in done]
    rows = sum(arr.shard_rows_range(s)[1] - arr.shard_rows_range(s)[0] for s in todo)
    log(f"{model} {label}: importing {len(todo)} of {arr.n_shards} shards ({rows:,} rows) of "
        f"{cache.format} cache {cache.path} into {root.url}/{path}")
    writer = f"{socket.gethostname()}:import"
    with tqdm(total=rows, unit="tok", unit_scale=True, desc=f"import {model}", disable=not progress,
              dynamic_ncols=True) as bar:
        for shard in todo:
            lo, hi = arr.shard_rows_range(shard)
            x = torch.from_numpy(cache.read_rows(lo, hi)) * arr.scale
            arr.write_shard(shard, S.encode(x, storage_dtype), writer=writer)
            bar.update(hi - lo)
    arr.finalize()
    if not has_tokens:
        notes.append("no tokens in this cache: training reads it as usual; stage-three splicing and "
                     "latent contexts are unavailable (recorded in the token set's attributes)")
    return ImportResult(ts_id, path, arr.scale, ctx, has_tokens, len(todo), arr.n_shards, notes)
