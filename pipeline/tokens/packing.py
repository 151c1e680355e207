"""Packing and mixing: the sources' documents become the token set's sequences, in their final order.

Per source, every document's ids (strings tokenized with ``add_special_tokens=False``) followed by
the source's separator (``separator``: the tokenizer's EOS unless the source names another token or
"none") are concatenated into one stream, cut into sequences of exactly ``context_length`` tokens:
``[BOS] + next context_length-1 stream tokens`` when the tokenizer has a BOS id, else the next
``context_length`` stream tokens. Sequences never mix sources; a trailing partial sequence is
dropped. The plan (``plan.py``) says which source gives each sequence and which of its sequences.

The order shuffles the sequences within each source too, so any sequence of a source may be needed
first while a source can only be read front to back. The build therefore runs in two passes: each
source's first ``counts[s]`` sequences are packed, in stream order, into a scratch file on local
disk (int32 ``[n_sequences, context_length]``: the token set's own size, never more of the corpus),
then read back in the final order, block by block. The scratch file lives in ``scratch_dir``
(default: the system's temporary directory, set by ``TMPDIR``) and is removed when the blocks are
done or abandoned. Memory is O(n_sequences) small integers (the order) plus one tokenization batch
and one block.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np

from pipeline.config import DEFAULT_SEPARATOR, NO_SEPARATOR, SourceSpec, TokenSpec
from pipeline.tokens.chat import Document, Renderer
from pipeline.tokens.errors import TokenSourceError, source_label
from pipeline.tokens.files import expand_paths, is_saved_dataset
from pipeline.tokens.plan import sizes, source_order, stream_order
from pipeline.tokens.sources import TOKENIZE_BATCH_DOCS, iter_documents

_WRITE_ROWS = 256  # sequences per write to the scratch file


def separator_id(index: int, src: SourceSpec, tokenizer) -> int | None:
    """The id that ends each document of the source, None for nothing.

    The separator is what the model reading the stream was trained to see between documents: a
    chat tokenizer's EOS is often its end-of-turn token, which a base model never saw end a
    document, so a source may name its own (input_checks refuses the telltale mismatches).
    """
    sep = src.separator
    if sep == DEFAULT_SEPARATOR:
        return tokenizer.eos_token_id
    if sep == NO_SEPARATOR:
        return None
    tid = tokenizer.get_vocab().get(sep) if sep else None
    if tid is None and sep:
        ids = tokenizer(sep, add_special_tokens=False)["input_ids"]
        tid = ids[0] if len(ids) == 1 else None
    if tid is None:
        name = getattr(tokenizer, "name_or_path", "") or "<in-memory>"
        raise TokenSourceError(
            f"{source_label(index, src)}: separator = {sep!r} is not one token of tokenizer {name!r}; "
            f"name one token as the tokenizer spells it (e.g. '<|end_of_text|>'), 'eos' for the "
            f"tokenizer's EOS, or 'none' for nothing between documents"
        )
    return int(tid)


class _SourceStream:
    """Packed sequences of one source, produced lazily; counts what it consumed for error messages."""

    def __init__(self, index: int, src: SourceSpec, tokenizer, context_length: int):
        self.index, self.src, self.tokenizer = index, src, tokenizer
        self.L = context_length
        self.bos = tokenizer.bos_token_id
        self.sep = separator_id(index, src, tokenizer)
        self.body = context_length - 1 if self.bos is not None else context_length
        self.stream_tokens = 0  # document tokens (incl. separators) read so far
        self.sequences = 0  # sequences handed out
        self._gen = self._sequences()

    def _tokenize(self, docs: list[Document]) -> list[list[int]]:
        texts = [d for d in docs if isinstance(d, str)]
        if not texts:
            return docs  # type: ignore[return-value]
        enc = iter(self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
        return [next(enc) if isinstance(d, str) else d for d in docs]

    def _batches(self) -> Iterator[list[list[int]]]:
        batch: list[Document] = []
        for doc in iter_documents(self.src, self.tokenizer, self.index):
            batch.append(doc)
            if len(batch) >= TOKENIZE_BATCH_DOCS:
                yield self._tokenize(batch)
                batch = []
        if batch:
            yield self._tokenize(batch)

    def _sequences(self) -> Iterator[np.ndarray]:
        body, buf = self.body, np.empty(0, dtype=np.int32)
        for ids_list in self._batches():
            flat: list[int] = []
            for ids in ids_list:
                # a chat template's own BOS would repeat the one every sequence starts with
                if self.bos is not None and len(ids) and ids[0] == self.bos:
                    ids = ids[1:]
                flat.extend(ids)
                if self.sep is not None:
                    flat.append(self.sep)
            self.stream_tokens += len(flat)
            buf = np.concatenate([buf, np.asarray(flat, dtype=np.int32)])
            n = len(buf) // body
            for k in range(n):
                row = np.empty(self.L, dtype=np.int32)
                if self.bos is not None:
                    row[0] = self.bos
                row[self.L - body:] = buf[k * body:(k + 1) * body]
                yield row
            buf = buf[n * body:].copy()

    def next(self, needed: int, total_weight: float) -> np.ndarray:
        try:
            row = next(self._gen)
        except StopIteration:
            raise TokenSourceError(
                f"{source_label(self.index, self.src)} ran out of data: it gave {self.sequences} "
                f"sequences ({self.stream_tokens:,} document tokens incl. separators) but the token set "
                f"needs {needed} sequences of {self.L} tokens ({needed * self.body:,} document tokens) from it. "
                f"Add data to this source, lower tokens.n_tokens, or lower its weight "
                f"({self.src.weight} of {total_weight} in total)"
            ) from None
        self.sequences += 1
        return row

    def close(self) -> None:
        self._gen.close()


def _check_sources(spec: TokenSpec, counts: list[int], tokenizer) -> None:
    """Fail before any work on what can be checked up front: files, globs, chat templates, separators."""
    for i, src in enumerate(spec.sources):
        if counts[i]:
            Renderer(i, src, tokenizer)
            separator_id(i, src, tokenizer)
            if src.paths:
                expand_paths(i, src)
            elif src.kind == "tokenized" and not is_saved_dataset(os.path.expanduser(src.name)):
                raise TokenSourceError(f"{source_label(i, src)}: {src.name!r} is not a save_to_disk directory")


def _pack(spec: TokenSpec, tokenizer, counts: list[int], path: str) -> None:
    """Every source's first counts[s] sequences, source after source, each in stream order."""
    from tqdm.auto import tqdm

    L = spec.context_length
    total_weight = float(sum(s.weight for s in spec.sources))
    with open(path, "wb") as f, tqdm(total=sum(counts) * L, unit="tok", unit_scale=True,
                                     desc="token set: packing", disable=None) as bar:
        for s, count in enumerate(counts):
            if not count:
                continue
            stream = _SourceStream(s, spec.sources[s], tokenizer, L)
            try:
                for lo in range(0, count, _WRITE_ROWS):
                    rows = [stream.next(count, total_weight) for _ in range(min(_WRITE_ROWS, count - lo))]
                    f.write(np.stack(rows).astype("<i4", copy=False).tobytes())
                    bar.update(len(rows) * L)
            finally:
                stream.close()


def iter_token_set(
    spec: TokenSpec, tokenizer, block_sequences: int = 1024, scratch_dir: str | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks (tokens int32 [b, context_length], source uint8 [b]) in final order; n_sequences rows
    in all, the last plan.n_validation of them the validation split. Deterministic: the same spec
    and tokenizer give the same blocks, whatever the block size, on every run."""
    if block_sequences < 1:
        raise ValueError(f"block_sequences = {block_sequences}: must be >= 1")
    n_sequences, _, counts = sizes(spec)
    _check_sources(spec, counts, tokenizer)
    L = spec.context_length
    labels = source_order(counts, spec.seed)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    rows = starts[labels] + stream_order(labels, counts, spec.seed)  # each position's scratch row
    row_bytes = L * 4
    with tempfile.TemporaryDirectory(prefix="mdiff-tokens-", dir=scratch_dir) as scratch:
        path = os.path.join(scratch, "sequences.i32")
        _pack(spec, tokenizer, counts, path)
        with open(path, "rb") as packed:
            for start in range(0, n_sequences, block_sequences):
                want = rows[start:start + block_sequences]
                tokens = np.empty((len(want), L), dtype=np.int32)
                for j in np.argsort(want, kind="stable").tolist():  # read the file forward
                    packed.seek(int(want[j]) * row_bytes)
                    tokens[j] = np.frombuffer(packed.read(row_bytes), dtype="<i4")
                yield tokens, labels[start:start + block_sequences].copy()


def build_token_set(spec: TokenSpec, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The whole token set in memory: (tokens int32 [n_sequences, context_length], source uint8)."""
    blocks = list(iter_token_set(spec, tokenizer))
    if not blocks:
        L = spec.context_length
        return np.empty((0, L), np.int32), np.empty(0, np.uint8)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
