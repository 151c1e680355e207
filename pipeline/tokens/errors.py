"""How a problem with a token source is reported: its error class and the label naming the source.

Every step of building a token set (checking the spec, hashing files, reading documents,
rendering chats, packing) reports problems the same way: a TokenSourceError that names the
source as `tokens.sources[i] (kind: name or paths)`, so the user finds the entry to fix.
"""

from __future__ import annotations

from pipeline.config import SourceSpec


class TokenSourceError(ValueError):
    """A source cannot provide what the token set needs (missing data, bad column, too few tokens)."""


def source_label(index: int, src: SourceSpec) -> str:
    parts = []
    if src.name is not None:
        parts.append(src.name + (f"/{src.config}" if src.config else ""))
    if src.paths:
        shown = ", ".join(src.paths[:3]) + (f", ... ({len(src.paths)} in all)" if len(src.paths) > 3 else "")
        parts.append(shown)
    return f"tokens.sources[{index}] ({src.kind}: {'; '.join(parts) or 'no name or paths'})"
