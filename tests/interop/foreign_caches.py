"""Foreign activation caches written from their documented layouts, for the import tests."""

from __future__ import annotations

import json

import numpy as np
import torch

D, CTX = 16, 8


def activations(n_rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_rows, D, generator=g) * 4 + torch.randn(D, generator=g) * 2


def write_dl_cache(parent, acts: torch.Tensor, shard_sizes, *, dtype: str | None = "float32",
                   tokens=None, ranges=None, shuffle=False, name="resid_post_layer_1_out"):
    """dictionary_learning's layout: <parent>/<submodule>_<io>/{config.json, shard_i.memmap/.meta}."""
    folder = parent / name
    folder.mkdir(parents=True)
    start = 0
    for i, rows in enumerate(shard_sizes):
        chunk = acts[start:start + rows]
        start += rows
        data = chunk.to(torch.bfloat16).view(torch.int16).numpy() if dtype == "bfloat16" else chunk.numpy()
        mm = np.memmap(folder / f"shard_{i}.memmap", dtype=data.dtype, mode="w+", shape=data.shape)
        mm[:] = data
        mm.flush()
        meta = {"shape": list(data.shape), **({"dtype": dtype} if dtype else {})}
        (folder / f"shard_{i}.meta").write_text(json.dumps(meta))
    (folder / "config.json").write_text(json.dumps({
        "batch_size": 4, "context_len": CTX, "shard_size": max(shard_sizes), "d_model": D,
        "shuffle_shards": shuffle, "io": "out", "total_size": start, "shard_count": len(shard_sizes),
        "store_tokens": tokens is not None, "store_sequence_ranges": ranges is not None}))
    if tokens is not None:
        torch.save(tokens, parent / "tokens.pt")
    if ranges is not None:
        torch.save(ranges, parent / "sequence_ranges.pt")
    return folder
