"""The documents of one source, in order, from every kind: text files, jsonl, parquet, and
Hugging Face datasets (on the Hub or saved to disk), raw or already tokenized.

Each reader picks the column (`column`, else "text", "messages" or "input_ids"), hands every value
to the chat renderer, and names the file and line or row of any bad value in its error.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator

from pipeline.config import SourceSpec
from pipeline.tokens.chat import Document, Renderer
from pipeline.tokens.errors import TokenSourceError, source_label
from pipeline.tokens.files import expand_paths, is_saved_dataset

TOKENIZE_BATCH_DOCS = 256  # documents per fast-tokenizer call (and parquet / dataset rows per read)


def _resolve_column(index: int, src: SourceSpec, available: Iterable[str], where: str) -> str:
    available = list(available)
    label = source_label(index, src)
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


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _text_documents(index: int, src: SourceSpec) -> Iterator[str]:
    for path in expand_paths(index, src):
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
                        f"{source_label(index, src)}: text_unit = {src.text_unit!r}; use line, paragraph or file"
                    )
        except UnicodeDecodeError as e:
            raise TokenSourceError(
                f"{source_label(index, src)}: {path} is not valid UTF-8 ({e}); convert it to UTF-8"
            ) from e


def _jsonl_values(index: int, src: SourceSpec, path: str, render: Renderer) -> Iterator[Document]:
    column = None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{os.path.basename(path)} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TokenSourceError(f"{source_label(index, src)}: {where} is not valid JSON ({e})") from e
            if not isinstance(rec, dict):
                raise TokenSourceError(
                    f"{source_label(index, src)}: {where} is a JSON {type(rec).__name__}, expected an object"
                )
            if column is None:
                column = _resolve_column(index, src, rec.keys(), where)
            if column not in rec:
                raise TokenSourceError(
                    f"{source_label(index, src)}: {where} has no {column!r} field (fields: {list(rec)})"
                )
            doc = render(rec[column], f"{where}, column {column!r}")
            if doc is not None:
                yield doc


def _parquet_values(index: int, src: SourceSpec, path: str, render: Renderer) -> Iterator[Document]:
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


def _file_values(index: int, src: SourceSpec, render: Renderer) -> Iterator[Document]:
    for path in expand_paths(index, src):
        if src.kind == "parquet" or (src.kind == "tokenized" and path.endswith(".parquet")):
            yield from _parquet_values(index, src, path, render)
        else:
            yield from _jsonl_values(index, src, path, render)


def _hf_values(index: int, src: SourceSpec, render: Renderer) -> Iterator[Document]:
    import datasets

    label = source_label(index, src)
    local = os.path.expanduser(src.name)
    if is_saved_dataset(local):
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
    render = Renderer(index, source, tokenizer)
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
        raise TokenSourceError(f"{source_label(index, source)}: unknown kind {source.kind!r}")
