"""Turning one record's value into a document: plain text, a conversation rendered with the
tokenizer's chat template, or token ids checked against the vocabulary.

Whatever the file format or dataset a value came from, the same rules apply: `chat = "yes"`
insists on conversations, `"no"` refuses them, `"auto"` renders the ones it finds; a source that
needs a chat template refuses a tokenizer without one before any document is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import SourceSpec
from pipeline.tokens.errors import TokenSourceError, source_label

Document = str | list[int]


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


class Renderer:
    """Turns one column value into a document (or None to skip it), applying the chat rules."""

    def __init__(self, index: int, src: SourceSpec, tokenizer):
        self.index, self.src, self.tokenizer = index, src, tokenizer
        self.label = source_label(index, src)
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
