"""Which arrays can be read together: the same rows of the same token set, laid out alike.

A crosscoder's batch row i must be the same token in every model, and the loader reads the same
chunk of every array into one window slot; so the arrays must share the token set, the row count,
the chunk and shard layout, the stored dtype, the hook and d_model. Refusing a mismatch here,
with every array's value, beats training on misaligned rows.
"""

from __future__ import annotations

from pipeline import store as S
from trainer.readers import where


class IncompatibleArraysError(S.StoreMismatchError, ValueError):
    """The arrays given to one loader cannot be read as aligned rows of one batch."""


def check_aligned(arrays: list[S.ActivationArray], token_set: S.TokenSet) -> None:
    """Refuse arrays whose rows are not the same tokens in the same layout, or not this token set's."""

    def differ(field: str, values: list, why: str = "") -> None:
        if any(v != values[0] for v in values):
            detail = "; ".join(f"{where(a)}: {v!r}" for a, v in zip(arrays, values))
            raise IncompatibleArraysError(f"the loader's arrays differ in {field} ({detail}){why}")

    differ("tokenset_id", [a.attrs.get("tokenset_id") for a in arrays],
           ": every model must be cached on the same token set")
    differ("n_rows", [a.n_rows for a in arrays])
    differ("chunk_rows", [a.chunk_rows for a in arrays], ": cache every model with the same [cache] settings")
    differ("shard_rows", [a.shard_rows for a in arrays], ": cache every model with the same [cache] settings")
    differ("storage_dtype", [a.storage_dtype for a in arrays], ": cache every model with the same [cache] settings")
    differ("hook", [(a.attrs.get("hook") or {}).get("label") for a in arrays],
           ": the loader reads one hook of every model")
    differ("d_model", [a.d_model for a in arrays],
           ": a crosscoder needs equal d_model in every model (batches are [batch, n_models, "
           "d_model]); train one SAE per model instead (train.models = [one name])")
    first = arrays[0]
    if first.attrs.get("tokenset_id") != token_set.id:
        raise IncompatibleArraysError(
            f"{where(first)} was cached on token set {first.attrs.get('tokenset_id')!r}, "
            f"not on {token_set.id!r} given to the loader")
    expected = token_set.n_sequences * token_set.context_length
    if first.n_rows != expected or first.attrs.get("context_length", token_set.context_length) != token_set.context_length:
        raise IncompatibleArraysError(
            f"{where(first)} has {first.n_rows:,} rows, but token set {token_set.id} has "
            f"{token_set.n_sequences:,} sequences of {token_set.context_length} ({expected:,} tokens)")
    if first.storage_dtype not in S.NUMPY_DTYPE:
        raise ValueError(f"{where(first)}: unknown storage_dtype {first.storage_dtype!r}")
