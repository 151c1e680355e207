"""The activation store: the only code that knows its paths, keys, encoding and completion records.

storage_layout.md is the contract with the trainer and the evaluations; this package implements
it, one job per module:

    errors        what can go wrong, and how a failed write is told
    layout        every store path (token sets, arrays, records, shard files), format versions
    root          StoreRoot: small records and Zarr access on a local disk or fsspec URL
    encoding      stored dtypes, compression codecs, checksums
    token_sets    writing and opening token sets
    arrays        activation arrays: create, open, read, record shards complete
    scales        the normalization rule (scale = sqrt(d_model) / mean norm)
    listing       what a store holds
    verify        checking chunks against their recorded checksums
    shard_files   reading shard files directly (the loader's fast path)

Callers import the package (`from pipeline import store as S`) and use the names below.
"""

from pipeline.store.arrays import (
    ActivationArray,
    array_attributes,
    array_complete,
    array_exists,
    create_activation_array,
    open_activation_array,
    read_rows,
)
from pipeline.store.encoding import NUMPY_DTYPE, TORCH_DTYPE, checksum, crc32, decode, encode
from pipeline.store.errors import (
    CorruptChunkError,
    IncompleteError,
    StoreError,
    StoreFormatError,
    StoreFullError,
    StoreMismatchError,
    StoreWriteError,
    human_bytes,
    is_connection_error,
    is_no_space,
    write_errors,
)
from pipeline.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    activation_path,
    check_format_version,
    check_key,
    tokenset_path,
)
from pipeline.store.listing import list_activation_arrays, list_model_keys, list_token_sets
from pipeline.store.root import StoreRoot
from pipeline.store.scales import NORMALIZATION, NORMALIZATION_IMPORTED, normalization_scale
from pipeline.store.shard_files import ShardFiles, shard_files_unsupported
from pipeline.store.token_sets import TokenSet, open_token_set, token_set_complete, write_token_set
from pipeline.store.verify import BadChunk, corrupt_chunk, recorded_checksums, verify_array

__all__ = [
    "FORMAT", "FORMAT_VERSION", "NORMALIZATION", "NORMALIZATION_IMPORTED", "NUMPY_DTYPE", "TORCH_DTYPE",
    "ActivationArray", "BadChunk", "CorruptChunkError", "IncompleteError", "ShardFiles", "StoreError",
    "StoreFormatError", "StoreFullError", "StoreMismatchError", "StoreRoot", "StoreWriteError", "TokenSet",
    "activation_path", "array_attributes", "array_complete", "array_exists", "check_format_version",
    "check_key", "checksum", "corrupt_chunk", "crc32", "create_activation_array", "decode", "encode",
    "human_bytes", "is_connection_error", "is_no_space", "list_activation_arrays", "list_model_keys",
    "list_token_sets", "normalization_scale", "open_activation_array", "open_token_set", "read_rows",
    "recorded_checksums", "shard_files_unsupported", "token_set_complete", "tokenset_path", "verify_array",
    "write_errors", "write_token_set",
]
