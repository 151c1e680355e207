"""Which local files and dataset folders a source names.

The id hashes these files and the readers read them, so both must expand `paths` the same way:
each entry in the given order, globs expanded and sorted, duplicates dropped, with a clear error
for a glob that matches nothing, a directory, or a missing file.
"""

from __future__ import annotations

import glob as _glob
import os

from pipeline.config import SourceSpec
from pipeline.tokens.errors import TokenSourceError, source_label


def expand_paths(index: int, src: SourceSpec) -> list[str]:
    """Files named by src.paths: each entry in the given order, globs expanded and sorted."""
    where = source_label(index, src)
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


def is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk."""
    return os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    )
