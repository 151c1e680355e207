"""Token sets in the store: writing one whole (idempotently) and opening a complete one.

A token set is the fixed tokens every model of an experiment is run over; it is written once per
id by whoever gets there first, and only a token set with its completion record, packed by this
code's rules (`tokenset_format`), is ever read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import zarr

from pipeline.store.errors import IncompleteError, StoreError, StoreMismatchError, write_errors
from pipeline.store.layout import (
    FORMAT_VERSION,
    TOKEN_SET_FORMAT,
    check_format_version,
    check_token_set_format,
    complete_record,
    token_set_arrays_path,
    tokenset_path,
)
from pipeline.store.root import StoreRoot


@dataclass
class TokenSet:
    """A complete token set: tokens [n_sequences, context_length] and each sequence's source."""

    id: str
    tokens: zarr.Array
    source: zarr.Array
    attrs: dict

    @property
    def n_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def context_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def n_train_sequences(self) -> int:
        return int(self.attrs["n_train_sequences"])


def token_set_complete(root: StoreRoot, tokenset_id: str) -> bool:
    return root.exists(complete_record(tokenset_path(tokenset_id)))


def write_token_set(root: StoreRoot, tokenset_id: str, n_sequences: int, context_length: int,
                    blocks, attrs: dict) -> TokenSet:
    """Write the token set from an iterator of (tokens, source) blocks, then mark it complete.

    Idempotent: the id is a hash of everything that determines the tokens, so a second writer
    (a concurrent job, or a rerun after a kill) writes the very same bytes.
    """
    store = root.zarr_store()
    path = tokenset_path(tokenset_id)
    rows = max(1, min(n_sequences, (1 << 20) // (4 * context_length)))  # ~1 MiB token chunks

    def member(group, name: str, **spec):
        # each piece on its own: a writer stopped between them leaves the group without the rest
        try:
            return group.create_array(name, compressors=None, fill_value=0, **spec)
        except zarr.errors.ContainsArrayError:
            return group[name]

    # The attributes go in with the group, not only at the end: zarr's create_group checks for an
    # existing group and then writes, so a second job that passed the check while the first was
    # finishing rewrote the group's metadata after the first had completed; with empty attributes
    # that lost n_train_sequences under the first job's feet. Now every writer writes the same.
    # every writer's rows follow this code's rules (imported ones keep their foreign order)
    final_attrs = {"format_version": FORMAT_VERSION, **attrs, "tokenset_format": TOKEN_SET_FORMAT}
    with write_errors(f"the metadata of token set {root.url}/{path}", 0, root):
        try:
            group = zarr.create_group(store=store, path=path, attributes=final_attrs)
        except zarr.errors.ContainsGroupError:
            group = zarr.open_group(store=store, path=path, mode="r+")
        tokens = member(group, "tokens", shape=(n_sequences, context_length), dtype="int32",
                        chunks=(rows, context_length))
        source = member(group, "source", shape=(n_sequences,), dtype="uint8", chunks=(max(rows, 4096),))
    if tokens.shape != (n_sequences, context_length) or source.shape != (n_sequences,):
        raise StoreMismatchError(
            f"{root.url}/{path}/tokens has shape {tokens.shape}, expected "
            f"{(n_sequences, context_length)}: the store is damaged; delete that folder."
        )
    start = 0
    for tok_block, src_block in blocks:
        stop = start + len(tok_block)
        with write_errors(f"sequences {start}-{stop} of token set {root.url}/{path}",
                          tok_block.nbytes + src_block.nbytes, root):
            tokens[start:stop] = tok_block
            source[start:stop] = src_block
        start = stop
    if start != n_sequences:
        raise StoreError(f"token set {tokenset_id}: got {start} sequences, expected {n_sequences}")
    group.attrs.update(final_attrs)  # a group created by an older version has none yet
    root.write_json(complete_record(path), {"n_sequences": n_sequences, "time": time.time()})
    return open_token_set(root, tokenset_id)


def open_token_set(root: StoreRoot, tokenset_id: str) -> TokenSet:
    path = tokenset_path(tokenset_id)
    if not token_set_complete(root, tokenset_id):
        raise IncompleteError(
            f"token set {tokenset_id} in {root.url} is missing or incomplete; "
            f"run `mdiff cache <config>` to (re)build it."
        )
    group = zarr.open_group(store=root.zarr_store(), path=path, mode="r")
    attrs = group.attrs.asdict()
    check_format_version(attrs, f"{root.url}/{path}")
    check_token_set_format(attrs, f"token set {tokenset_id} in {root.url}", _rebuild(root, tokenset_id))
    return TokenSet(tokenset_id, group["tokens"], group["source"], attrs)


def _rebuild(root: StoreRoot, tokenset_id: str) -> str:
    return (
        f"To rebuild it, run `mdiff cache <config>` again: the format is part of the token set id, "
        f"so the same config now names a new token set and caches every model on it (then rerun "
        f"`mdiff train <config>` and `mdiff eval <config>`: dictionaries trained on the old one "
        f"belong to its order). Delete {root.url}/{tokenset_path(tokenset_id)} and "
        f"{root.url}/{token_set_arrays_path(tokenset_id)} (the activations cached on it) to free their space."
    )
