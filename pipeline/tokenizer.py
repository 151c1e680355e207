"""A model's tokenizer: loading it, fingerprinting what decides its token ids, and checking that
the models of one experiment share one.

Model diffing compares activations position by position, so every model must read the same token
ids: a token set is built with one tokenizer and fed to all of them. The fingerprints say when two
tokenizers make the same ids (token sets are keyed by them, so they must stay byte for byte the
same), and `check_same_tokenizer` refuses models whose vocabularies differ.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline.checkpoints import from_pretrained, hub_cache_dir, locate
from pipeline.config import ModelSpec
from pipeline.records import canonical_hash


class TokenizerMismatchError(ValueError):
    """Two models of one experiment tokenize differently, so their activations are not aligned."""


def load_tokenizer(spec: ModelSpec, cache_dir: str | os.PathLike | None = None):
    """The model's own tokenizer, from the same source (and snapshot) as its weights."""
    from transformers import AutoTokenizer

    cache = hub_cache_dir(cache_dir)
    name_or_path, kwargs, _ = locate(spec, cache)
    return from_pretrained(spec, "tokenizer", AutoTokenizer, name_or_path, kwargs, cache)


def _special_ids(tokenizer) -> dict:
    return {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}


def _backend_state(tokenizer) -> object:
    """What decides the ids of a plain text: vocabulary, added tokens, normalization,
    pre-tokenization, model and post-processing.

    Padding/truncation settings are dropped: transformers sets them on the backend as a side effect
    of calls with padding=True, and they do not change which ids a text becomes.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items())}
    state = json.loads(backend.to_str())
    state.pop("padding", None)
    state.pop("truncation", None)
    return state


def tokenizer_fingerprint(tokenizer) -> str:
    """Equal fingerprints mean equal token ids for every text, chat and padded batch: what a token
    set built with this tokenizer depends on."""
    return canonical_hash({"tokenizer": _backend_state(tokenizer), "special_ids": _special_ids(tokenizer),
                           "chat_template": getattr(tokenizer, "chat_template", None)}, compact=False)


def vocabulary_fingerprint(tokenizer) -> str:
    """Equal fingerprints mean every id names the same token and every plain text becomes the same
    ids. Which ids are called eos/pad and the chat template are left out: a token set is built
    with one tokenizer and its ids are fed to every model, so those may differ between models
    (a base model and its chat version usually name different end-of-text tokens)."""
    return canonical_hash(_backend_state(tokenizer), compact=False)


def _difference_hint(a, b) -> str:
    """Only computed on the error path, so a full vocabulary scan is affordable."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        ia = {i: t for t, i in va.items()}
        ib = {i: t for t, i in vb.items()}
        first = next((i for i in sorted(ia.keys() | ib.keys()) if ia.get(i) != ib.get(i)), None)
        return (f"vocab sizes {len(va)} vs {len(vb)}; first differing token id {first}: "
                f"{ia.get(first)!r} vs {ib.get(first)!r}")
    if _special_ids(a) != _special_ids(b):
        return f"same vocabulary, different special tokens: {_special_ids(a)} vs {_special_ids(b)}"
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        return "same vocabulary, different chat templates"
    return "same vocabulary, different normalization, pre-tokenization or post-processing"


def check_same_tokenizer(named: list[tuple[str, Any]]) -> list[str]:
    """Model diffing compares activations position by position, which needs identical token ids:
    a different vocabulary is refused. Differences only in special-token roles or chat template are
    returned as notes (the token set is built with one of the tokenizers; `tokens.tokenizer`)."""
    if len(named) < 2:
        return []
    first_name, first_tok = named[0]
    reference, vocabulary = tokenizer_fingerprint(first_tok), vocabulary_fingerprint(first_tok)
    notes = []
    for name, tok in named[1:]:
        if tokenizer_fingerprint(tok) == reference:
            continue
        if vocabulary_fingerprint(tok) != vocabulary:
            raise TokenizerMismatchError(
                f"models {first_name!r} and {name!r} have different tokenizers "
                f"({_difference_hint(first_tok, tok)}); all models of an experiment must share a "
                "tokenizer, so compare checkpoints of one model family"
            )
        notes.append(f"models {first_name!r} and {name!r} share a vocabulary but not everything else "
                     f"({_difference_hint(first_tok, tok)}); the token set is built with one tokenizer "
                     "(tokens.tokenizer, default the first model's) and both models read its ids")
    return notes
