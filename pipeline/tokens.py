"""Turn the configured sources into ONE fixed token set: every model is run over exactly these tokens.

Pure computation, no store I/O: `iter_token_set` streams blocks of packed sequences in their final
order and the store writer persists them; `token_set_id` names the set by everything that
determines its tokens, so a cache can tell whether it was built from the same tokens.

How a token set is made
-----------------------
1. Each source yields documents (str, or list[int] for ``kind = "tokenized"``).
2. Per source, every document's ids (strings tokenized with ``add_special_tokens=False``) followed
   by the EOS id (if the tokenizer has one) are concatenated into one stream, cut into sequences of
   exactly ``context_length`` tokens: ``[BOS] + next context_length-1 stream tokens`` when the
   tokenizer has a BOS id, else the next ``context_length`` stream tokens. Sequences never mix
   sources; a trailing partial sequence is dropped.
3. ``n_sequences = n_tokens // context_length`` is split between sources in proportion to their
   weights (largest remainder; every source with weight > 0 gets at least one sequence when there
   are enough). ``labels = np.repeat(arange(n_sources), counts)`` shuffled by
   ``np.random.default_rng(seed)`` gives the final order: position i is the next sequence of source
   ``labels[i]``. The LAST ``n_validation`` sequences are the validation split.

Memory is O(n_sequences) bytes (the labels) plus one tokenization batch per source.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import SourceSpec, TokenSpec

__all__ = [
    "TokenSourceError",
    "TokenSetPlan",
    "plan_token_set",
    "describe_sources",
    "token_set_id",
    "iter_documents",
    "iter_token_set",
    "build_token_set",
    "TOKEN_SET_FORMAT",
]

TOKEN_SET_FORMAT = 1  # bump when the packing / mixing rules change: it is part of the id
TOKENIZE_BATCH_DOCS = 256  # documents per fast-tokenizer call
MAX_SOURCES = 256  # source labels are stored as uint8

Document = str | list[int]


class TokenSourceError(ValueError):
    """A source cannot provide what the token set needs (missing data, bad column, too few tokens)."""


# --------------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class TokenSetPlan:
    n_sequences: int
    context_length: int
    n_tokens: int  # n_sequences * context_length (the tokens actually produced)
    n_validation: int  # the last n_validation sequences are the validation split
    n_train_sequences: int
    counts: list[int]  # sequences per source, in source order
    source_descriptions: list[dict]


def _source_label(index: int, src: SourceSpec) -> str:
    parts = []
    if src.name is not None:
        parts.append(src.name + (f"/{src.config}" if src.config else ""))
    if src.paths:
        shown = ", ".join(src.paths[:3]) + (f", ... ({len(src.paths)} in all)" if len(src.paths) > 3 else "")
        parts.append(shown)
    return f"tokens.sources[{index}] ({src.kind}: {'; '.join(parts) or 'no name or paths'})"


def _validate_spec(spec: TokenSpec) -> None:
    problems = []
    if not spec.sources:
        problems.append("tokens.sources is empty: add at least one source")
    if len(spec.sources) > MAX_SOURCES:
        problems.append(f"tokens.sources has {len(spec.sources)} entries; at most {MAX_SOURCES} are supported")
    if not isinstance(spec.context_length, int) or spec.context_length < 2:
        problems.append(f"tokens.context_length = {spec.context_length!r}: must be an integer >= 2")
    elif not isinstance(spec.n_tokens, int) or spec.n_tokens < spec.context_length:
        problems.append(
            f"tokens.n_tokens = {spec.n_tokens!r} is less than context_length = {spec.context_length}: "
            "raise n_tokens to at least one sequence"
        )
    vf = spec.validation_fraction
    if not isinstance(vf, (int, float)) or not (0.0 <= vf < 1.0) or math.isnan(vf):
        problems.append(f"tokens.validation_fraction = {vf!r}: must be in [0, 1)")
    if not isinstance(spec.seed, int) or spec.seed < 0:
        problems.append(f"tokens.seed = {spec.seed!r}: must be a non-negative integer")
    for i, src in enumerate(spec.sources):
        where = _source_label(i, src)
        w = src.weight
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            problems.append(f"{where}: weight = {w!r} must be a finite number >= 0")
        if src.kind in ("text", "jsonl", "parquet") and not src.paths:
            problems.append(f"{where}: kind {src.kind!r} needs `paths` (files or globs)")
        elif src.kind == "hf" and not src.name:
            problems.append(f"{where}: kind 'hf' needs `name` (a dataset name or local directory)")
        elif src.kind == "tokenized" and bool(src.name) == bool(src.paths):
            problems.append(
                f"{where}: kind 'tokenized' needs exactly one of `name` (a save_to_disk directory) "
                "or `paths` (jsonl/parquet files)"
            )
        elif src.kind not in ("text", "jsonl", "parquet", "hf", "tokenized"):
            problems.append(f"{where}: unknown kind {src.kind!r}; use text, jsonl, parquet, hf or tokenized")
    if spec.sources and not problems and sum(s.weight for s in spec.sources) <= 0:
        problems.append("every tokens.sources[*].weight is 0: give at least one source a positive weight")
    if problems:
        raise ValueError("invalid token spec:\n  - " + "\n  - ".join(problems))


def _allocate(n: int, weights: list[float]) -> list[int]:
    """Largest-remainder split of n by weights (exact rational arithmetic, ties to the lower index);
    then every positive-weight source gets at least one, taken from the largest count, if n allows."""
    ws = [Fraction(w) for w in weights]
    total = sum(ws)
    quotas = [n * w / total for w in ws]
    counts = [math.floor(q) for q in quotas]
    left = n - sum(counts)
    order = sorted(range(len(ws)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    positive = [i for i, w in enumerate(ws) if w > 0]
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
                counts[donor] -= 1
                counts[i] += 1
    return counts


def _labels(counts: list[int], seed: int) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts), dtype=np.uint8), counts)
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _sizes(spec: TokenSpec) -> tuple[int, int, list[int]]:
    """(n_sequences, n_validation, counts) after validating the spec; reads no data."""
    _validate_spec(spec)
    L = spec.context_length
    n = spec.n_tokens // L
    n_val = 0
    if spec.validation_fraction > 0:
        n_val = max(1, round(n * spec.validation_fraction))
        if n_val >= n:
            raise ValueError(
                f"tokens.validation_fraction = {spec.validation_fraction} leaves no training sequences "
                f"({n_val} of {n} sequences of {L} tokens would be validation): raise tokens.n_tokens "
                "or lower validation_fraction"
            )
    return n, n_val, _allocate(n, [float(s.weight) for s in spec.sources])


def plan_token_set(spec: TokenSpec) -> TokenSetPlan:
    """The sizes of the token set (no tokenization; local files are hashed for the descriptions)."""
    n, n_val, counts = _sizes(spec)
    return TokenSetPlan(
        n_sequences=n,
        context_length=spec.context_length,
        n_tokens=n * spec.context_length,
        n_validation=n_val,
        n_train_sequences=n - n_val,
        counts=counts,
        source_descriptions=describe_sources(spec),
    )


# --------------------------------------------------------------------------------------------------
# Describing sources (what the id is made of)


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expand_paths(index: int, src: SourceSpec) -> list[str]:
    """Files named by src.paths: each entry in the given order, globs expanded and sorted."""
    where = _source_label(index, src)
    out: list[str] = []
    for entry in src.paths:
        p = os.path.expanduser(entry)
        if any(c in p for c in "*?["):
            matches = sorted(m for m in _glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise TokenSourceError(f"{where}: glob {entry!r} matches no file; fix the pattern or add the data")
            out.extend(matches)
        elif os.path.isdir(p):
            raise TokenSourceError(
                f"{where}: path {entry!r} is a directory; name its files or use a glob such as "
                f"{os.path.join(entry, '*.jsonl')!r}"
            )
        elif not os.path.isfile(p):
            raise TokenSourceError(f"{where}: file {entry!r} does not exist; fix the path")
        else:
            out.append(p)
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )


def _hash_dir(path: str) -> list[list[str]]:
    """[relative posix path, sha256] of every non-hidden file under `path`, sorted."""
    rows = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            full = os.path.join(root, f)
            rows.append([Path(os.path.relpath(full, path)).as_posix(), _sha256_file(full)])
    return sorted(rows)


def describe_sources(spec: TokenSpec) -> list[dict]:
    """A JSON-able description of each source that determines its content.

    Local files are identified by [basename, sha256] (not their absolute path, so moving the data
    keeps the id); a local dataset directory (hf / tokenized `name`) by [relative path, sha256] of
    every non-hidden file in it, with `name` set to None. Fields that do not affect a kind are None.
    """
    out = []
    for i, src in enumerate(spec.sources):
        d: dict[str, Any] = {
            "kind": src.kind,
            "name": src.name,
            "config": src.config if src.kind == "hf" else None,
            "split": src.split if src.kind in ("hf", "tokenized") else None,
            "revision": src.revision if src.kind == "hf" else None,
            "column": src.column if src.kind != "text" else None,
            "chat": src.chat if src.kind != "tokenized" else None,
            "text_unit": src.text_unit if src.kind == "text" else None,
            "weight": float(src.weight),
        }
        if src.kind in ("hf", "tokenized") and src.name:
            local = os.path.expanduser(src.name)
            if os.path.isdir(local):
                d["name"] = None
                d["files"] = _hash_dir(local)
                if not d["files"]:
                    raise TokenSourceError(f"{_source_label(i, src)}: directory {src.name!r} holds no files")
            elif src.kind == "tokenized":
                raise TokenSourceError(
                    f"{_source_label(i, src)}: name {src.name!r} is not a directory; kind 'tokenized' "
                    "reads a local save_to_disk directory (or use `paths` for jsonl/parquet files)"
                )
        if src.paths:
            d["files"] = [[os.path.basename(p), _sha256_file(p)] for p in _expand_paths(i, src)]
        out.append(d)
    return out


def token_set_id(spec: TokenSpec, tokenizer_fingerprint: str, descriptions: list[dict] | None = None) -> str:
    """"ts-" + 16 hex of sha256 over everything that determines the tokens.

    `descriptions` may pass `plan.source_descriptions` (= describe_sources(spec)) to avoid hashing
    the local files a second time.
    """
    payload = {
        "format": TOKEN_SET_FORMAT,
        "sources": describe_sources(spec) if descriptions is None else descriptions,
        "context_length": spec.context_length,
        "n_tokens": spec.n_tokens,
        "validation_fraction": float(spec.validation_fraction),
        "seed": spec.seed,
        "tokenizer": tokenizer_fingerprint,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "ts-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Documents


def _tokenizer_label(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "<in-memory>"
    return f"{type(tokenizer).__name__}({name!r})"


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _is_conversation(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)
    )


def _resolve_column(index: int, src: SourceSpec, available: Iterable[str], where: str) -> str:
    available = list(available)
    label = _source_label(index, src)
    if src.column is not None:
        if src.column not in available:
            raise TokenSourceError(
                f"{label}: column {src.column!r} not found in {where} (columns: {available}); fix `column`"
            )
        return src.column
    if src.kind == "tokenized":
        if "input_ids" not in available:
            raise TokenSourceError(
                f"{label}: no 'input_ids' column in {where} (columns: {available}); set `column`"
            )
        return "input_ids"
    if "text" in available:
        return "text"
    if "messages" in available and src.chat != "no":
        return "messages"
    raise TokenSourceError(
        f"{label}: no 'text' column in {where} (columns: {available}); set `column` "
        "(conversations in a 'messages' column are used unless chat = 'no')"
    )


class _Renderer:
    """Turns one column value into a document (or None to skip it), applying the chat rules."""

    def __init__(self, index: int, src: SourceSpec, tokenizer):
        self.index, self.src, self.tokenizer = index, src, tokenizer
        self.label = _source_label(index, src)
        self.vocab = len(tokenizer) if tokenizer is not None else None
        if src.kind != "tokenized" and src.chat == "yes" and not _has_chat_template(tokenizer):
            self._no_template()

    def _no_template(self):
        raise TokenSourceError(
            f"{self.label}: chat rendering is needed but tokenizer {_tokenizer_label(self.tokenizer)} "
            "has no chat template; use a tokenizer with a chat template, or set chat = 'no' and a "
            "plain-text column"
        )

    def __call__(self, value: Any, where: str) -> Document | None:
        if self.src.kind == "tokenized":
            return self._ids(value, where)
        if value is None:
            return None
        if isinstance(value, str):
            if self.src.chat == "yes":
                raise TokenSourceError(
                    f"{self.label}: chat = 'yes' but {where} holds a string, not a conversation "
                    "(a list of {role, content}); set chat = 'auto' or 'no', or point `column` at the messages"
                )
            return value or None
        if isinstance(value, list) and not value:
            return None
        if _is_conversation(value):
            if self.src.chat == "no":
                raise TokenSourceError(
                    f"{self.label}: {where} holds conversations but chat = 'no'; set chat = 'auto' "
                    "to render them with the chat template, or point `column` at a text column"
                )
            if not _has_chat_template(self.tokenizer):
                self._no_template()
            messages = [{k: v for k, v in m.items() if v is not None} for m in value]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        raise TokenSourceError(
            f"{self.label}: {where} holds a {type(value).__name__}, expected a string or a conversation "
            "(a list of {role, content}); fix `column`"
        )

    def _ids(self, value: Any, where: str) -> list[int] | None:
        if value is None:
            return None
        try:
            arr = np.asarray(value)
        except Exception:  # noqa: BLE001 - ragged or odd values: report below
            arr = None
        if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise TokenSourceError(
                f"{self.label}: {where} is not a flat list of integer token ids; fix `column`"
            )
        if arr.size == 0:
            return None
        if self.vocab is not None and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab):
            bad = int(arr.max()) if int(arr.max()) >= self.vocab else int(arr.min())
            raise TokenSourceError(
                f"{self.label}: {where} holds token id {bad}, outside the vocabulary of tokenizer "
                f"{_tokenizer_label(self.tokenizer)} (size {self.vocab}); tokenize the data with the "
                "same tokenizer, or set tokens.tokenizer to the model it was tokenized for"
            )
        return arr.tolist()


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_documents(index: int, src: SourceSpec) -> Iterator[str]:
    for path in _expand_paths(index, src):
        try:
            with _open_text(path) as f:
                if src.text_unit == "file":
                    text = f.read()
                    if text.strip():
                        yield text
                elif src.text_unit == "line":
                    for line in f:
                        line = line.rstrip("\r\n")
                        if line.strip():
                            yield line
                elif src.text_unit == "paragraph":
                    para: list[str] = []
                    for line in f:
                        line = line.rstrip("\r\n")
                        if line.strip():
                            para.append(line)
                        elif para:
                            yield "\n".join(para).strip()
                            para = []
                    if para:
                        yield "\n".join(para).strip()
                else:
                    raise TokenSourceError(
                        f"{_source_label(index, src)}: text_unit = {src.text_unit!r}; use line, paragraph or file"
                    )
        except UnicodeDecodeError as e:
            raise TokenSourceError(
                f"{_source_label(index, src)}: {path} is not valid UTF-8 ({e}); convert it to UTF-8"
            ) from e


def _jsonl_values(index: int, src: SourceSpec, path: str, render: _Renderer) -> Iterator[Document]:
    column = None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(path)} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenSourceError(f"{_source_label(index, src)}: {where} is not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise TokenSourceError(
                    f"{_source_label(index, src)}: {where} is a JSON {type(rec).__name__}, expected an object"
                )
            if column is None:
                column = _resolve_column(index, src, rec.keys(), where)
            if column not in rec:
                raise TokenSourceError(
                    f"{_source_label(index, src)}: {where} has no {column!r} field (fields: {list(rec)})"
                )
            doc = render(rec[column], f"{where}, column {column!r}")
            if doc is not None:
                yield doc


def _parquet_values(index: int, src: SourceSpec, path: str, render: _Renderer) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    where = os.path.basename(path)
    column = _resolve_column(index, src, pf.schema_arrow.names, where)
    row = 0
    for batch in pf.iter_batches(batch_size=TOKENIZE_BATCH_DOCS, columns=[column]):
        for value in batch.column(0).to_pylist():
            doc = render(value, f"{where} row {row}, column {column!r}")
            row += 1
            if doc is not None:
                yield doc


def _file_values(index: int, src: SourceSpec, render: _Renderer) -> Iterator[Document]:
    for path in _expand_paths(index, src):
        if src.kind == "parquet" or (src.kind == "tokenized" and path.endswith(".parquet")):
            yield from _parquet_values(index, src, path, render)
        else:
            yield from _jsonl_values(index, src, path, render)


def _hf_values(index: int, src: SourceSpec, render: _Renderer) -> Iterator[Document]:
    import datasets

    label = _source_label(index, src)
    local = os.path.expanduser(src.name)
    if _is_saved_dataset(local):
        ds = datasets.load_from_disk(local)
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise TokenSourceError(
                    f"{label}: split {src.split!r} not in the saved dataset (splits: {list(ds)}); fix `split`"
                )
            ds = ds[src.split]
        where = f"{src.name} [{src.split}]"
        column = _resolve_column(index, src, ds.column_names, where)
        row = 0
        for batch in ds.select_columns([column]).iter(batch_size=TOKENIZE_BATCH_DOCS):
            for value in batch[column]:
                doc = render(value, f"{where} row {row}, column {column!r}")
                row += 1
                if doc is not None:
                    yield doc
        return
    if src.kind == "tokenized":
        raise TokenSourceError(f"{label}: {src.name!r} is not a save_to_disk directory; fix `name`")
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, revision=src.revision, streaming=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the source and the fix
        raise TokenSourceError(
            f"{label}: could not open dataset {src.name!r} (config {src.config!r}, split {src.split!r}, "
            f"revision {src.revision!r}): {type(e).__name__}: {e}. Check the name, config and split, "
            "and that the data is cached or reachable (HF_DATASETS_OFFLINE is honored)"
        ) from e
    where = f"{src.name} [{src.split}]"
    column = None
    for row, rec in enumerate(ds):
        if column is None:
            names = ds.column_names or list(rec)
            column = _resolve_column(index, src, names, where)
        doc = render(rec.get(column), f"{where} row {row}, column {column!r}")
        if doc is not None:
            yield doc


def iter_documents(source: SourceSpec, tokenizer=None, index: int = 0) -> Iterator[Document]:
    """The documents of one source, in order: str, or list[int] for kind 'tokenized'.

    `tokenizer` renders conversations (chat template) and bounds token ids; `index` is the source's
    position in tokens.sources, used in error messages.
    """
    render = _Renderer(index, source, tokenizer)
    if source.kind == "text":
        yield from _text_documents(index, source)
    elif source.kind in ("jsonl", "parquet"):
        yield from _file_values(index, source, render)
    elif source.kind == "hf":
        yield from _hf_values(index, source, render)
    elif source.kind == "tokenized":
        if source.paths:
            yield from _file_values(index, source, render)
        else:
            yield from _hf_values(index, source, render)
    else:
        raise TokenSourceError(f"{_source_label(index, source)}: unknown kind {source.kind!r}")


# --------------------------------------------------------------------------------------------------
# Packing and mixing


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
                f"{_source_label(self.index, self.src)} ran out of data: it gave {self.sequences} "
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
    n_sequences, _, counts = _sizes(spec)
    # fail before any work on what can be checked up front: files, globs, chat templates
    for i, src in enumerate(spec.sources):
        if counts[i]:
            _Renderer(i, src, tokenizer)
            if src.paths:
                _expand_paths(i, src)
            elif src.kind == "tokenized" and not _is_saved_dataset(os.path.expanduser(src.name)):
                raise TokenSourceError(f"{_source_label(i, src)}: {src.name!r} is not a save_to_disk directory")
    L = spec.context_length
    labels = _labels(counts, spec.seed)
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
