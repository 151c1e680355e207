"""Packing and mixing: the sources' documents become the token set's sequences, in their final order.

Per source, every document's ids (strings tokenized with ``add_special_tokens=False``) followed by
the EOS id (if the tokenizer has one) are concatenated into one stream, cut into sequences of
exactly ``context_length`` tokens: ``[BOS] + next context_length-1 stream tokens`` when the
tokenizer has a BOS id, else the next ``context_length`` stream tokens. Sequences never mix
sources; a trailing partial sequence is dropped. The plan's source order says which source gives
each next sequence.

Memory is O(n_sequences) bytes (the labels) plus one tokenization batch per source.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipeline.config import SourceSpec, TokenSpec
from pipeline.tokens.chat import Document, Renderer
from pipeline.tokens.errors import TokenSourceError, source_label
from pipeline.tokens.files import expand_paths, is_saved_dataset
from pipeline.tokens.plan import sizes, source_order
from pipeline.tokens.sources import TOKENIZE_BATCH_DOCS, iter_documents


class _SourceStream:
    """Packed sequences of one source, produced lazily; counts what it consumed for error messages."""

    def __init__(self, index: int, src: SourceSpec, tokenizer, context_length: int):
        self.index, self.src, self.tokenizer = index, src, tokenizer
        self.L = context_length
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.body = context_length - 1 if self.bos is not None else context_length
        self.stream_tokens = 0  # document tokens (incl. EOS) read so far
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
                if self.eos is not None:
                    flat.append(self.eos)
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
                f"sequences ({self.stream_tokens:,} document tokens incl. EOS) but the token set needs "
                f"{needed} sequences of {self.L} tokens ({needed * self.body:,} document tokens) from it. "
                f"Add data to this source, lower tokens.n_tokens, or lower its weight "
                f"({self.src.weight} of {total_weight} in total)"
            ) from None
        self.sequences += 1
        return row

    def close(self) -> None:
        self._gen.close()


def iter_token_set(
    spec: TokenSpec, tokenizer, block_sequences: int = 1024
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks (tokens int32 [b, context_length], source uint8 [b]) in final order; n_sequences rows
    in all, the last plan.n_validation of them the validation split. Deterministic."""
    from tqdm.auto import tqdm

    if block_sequences < 1:
        raise ValueError(f"block_sequences = {block_sequences}: must be >= 1")
    n_sequences, _, counts = sizes(spec)
    # fail before any work on what can be checked up front: files, globs, chat templates
    for i, src in enumerate(spec.sources):
        if counts[i]:
            Renderer(i, src, tokenizer)
            if src.paths:
                expand_paths(i, src)
            elif src.kind == "tokenized" and not is_saved_dataset(os.path.expanduser(src.name)):
                raise TokenSourceError(f"{source_label(i, src)}: {src.name!r} is not a save_to_disk directory")
    L = spec.context_length
    labels = source_order(counts, spec.seed)
    total_weight = float(sum(s.weight for s in spec.sources))
    streams: dict[int, _SourceStream] = {}
    bar = tqdm(total=n_sequences * L, unit="tok", unit_scale=True, desc="token set", disable=None)
    try:
        for start in range(0, n_sequences, block_sequences):
            lab = labels[start:start + block_sequences]
            tokens = np.empty((len(lab), L), dtype=np.int32)
            for j, s in enumerate(lab.tolist()):
                stream = streams.get(s)
                if stream is None:
                    stream = streams[s] = _SourceStream(s, spec.sources[s], tokenizer, L)
                tokens[j] = stream.next(counts[s], total_weight)
            bar.update(tokens.size)
            yield tokens, lab.copy()
    finally:
        bar.close()
        for stream in streams.values():
            stream.close()


def build_token_set(spec: TokenSpec, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The whole token set in memory: (tokens int32 [n_sequences, context_length], source uint8)."""
    blocks = list(iter_token_set(spec, tokenizer))
    if not blocks:
        L = spec.context_length
        return np.empty((0, L), np.int32), np.empty(0, np.uint8)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
