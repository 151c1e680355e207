"""Dictionaries in the formats the field already uses, read into our layout and written from it.

Readers (each returns a `ForeignDictionary`: our dictionary in the foreign input units, plus
where it came from): SAELens SAEs, dictionary_learning's `ae.pt` dictionaries and crosscoders,
and the Gemma-2-2b model-diffing crosscoder format. `attach.import_dictionary` re-expresses one
in a store's normalized units and saves it where `mdiff eval` evaluates it; `saelens.export`
writes one of our SAEs for SAELens.
"""

from __future__ import annotations

from pathlib import Path

from . import dictionary_learning, gemma_crosscoder, saelens
from .common import ForeignDictionary, FormatError

READERS = {"saelens": saelens.read, "dictionary_learning": dictionary_learning.read,
           "gemma_crosscoder": gemma_crosscoder.read}

__all__ = ["READERS", "FormatError", "ForeignDictionary", "detect_format", "read_foreign"]


def detect_format(path: str | Path) -> str:
    """Which reader a path is for, from the files it holds."""
    path = Path(path)
    if saelens.is_saelens(path):
        return "saelens"
    if dictionary_learning.locate(path) is not None:
        return "dictionary_learning"
    if gemma_crosscoder.locate(path) is not None:
        return "gemma_crosscoder"
    raise FormatError(
        f"{path}: no known dictionary format: expected a SAELens folder ({saelens.CFG_FILE} + "
        f"{saelens.WEIGHTS_FILE}), a dictionary_learning folder ({dictionary_learning.WEIGHTS_FILE} + "
        f"{dictionary_learning.CONFIG_FILE}) or a crosscoder ({gemma_crosscoder.WEIGHTS_FILE} + "
        f"{gemma_crosscoder.CFG_FILE}); name the format explicitly if the files are renamed")


def read_foreign(path: str | Path, format: str = "auto",
                 input_scales: list[float] | None = None) -> ForeignDictionary:
    """Read the dictionary at `path` (format "auto": detected from its files)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in READERS:
        raise FormatError(f"unknown format {format!r}; use auto or one of {', '.join(READERS)}")
    return READERS[fmt](path, input_scales)
