"""How activations become stored values and bytes: dtypes, compression codecs and checksums.

storage_layout.md fixes the encoding (bfloat16 kept as its raw bits in uint16, float32 as is,
optional Blosc zstd, the zlib CRC-32 of each decoded chunk); the writers, the loader and the
verifier all encode, decode and checksum through these functions, so they cannot disagree.
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec

try:  # zlib's CRC-32, ~4x faster (13-16 vs 3.7 GB/s here): the loader checks every chunk it reads
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives the same values
    from zlib import crc32

ZARR_DTYPE = {"bfloat16": "uint16", "float32": "float32"}
NUMPY_DTYPE = {"bfloat16": np.uint16, "float32": np.float32}  # the stored values, as numpy sees them
TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float32": torch.float32}  # ... and as torch reads them


def encode(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Tensor -> the numpy array zarr stores. bfloat16 is kept as its raw bits in uint16."""
    if storage_dtype == "bfloat16":
        return t.to(torch.bfloat16).contiguous().cpu().view(torch.uint16).numpy()
    return t.to(torch.float32).contiguous().cpu().numpy()


def decode(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if storage_dtype == "bfloat16" else t


def checksum(a: np.ndarray) -> int:
    return crc32(np.ascontiguousarray(a).view(np.uint8).data)


def compression_codecs(compression: str, storage_dtype: str):
    """Zarr's compressors for the config's `compression` (None: stored uncompressed)."""
    if compression == "none":
        return None
    typesize = 2 if storage_dtype == "bfloat16" else 4
    # Byte shuffle with the right typesize and >= 1 MiB blocks: 1.16x on real-looking activations
    # (shared/docs/storage-measurements.md); smaller blocks or typesize 1 make shuffle useless.
    return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=typesize,
                       blocksize=1 << 20)]
