"""Where a store lives: a local directory or an fsspec URL.

One rule for every reader of a `store = ...` value: `file://` names a local directory (and a
relative one is relative to the config file, like any other local path); any other `scheme://`
is a remote filesystem that fsspec opens with the storage options.
"""

from __future__ import annotations

import os


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    """The directory a local store value names (`file://` dropped)."""
    return url.removeprefix("file://")


def absolute_path(path: str, base_dir: str) -> str:
    """`path` (with `~` expanded) relative to `base_dir`, normalized."""
    try:
        path = os.path.expanduser(path)
    except (ValueError, OSError):  # e.g. an embedded NUL byte; the existence check reports it
        pass
    return os.path.normpath(os.path.join(base_dir, path))


def resolve_store(store: str, base_dir: str) -> str:
    """A remote URL unchanged; a local directory (plain or `file://`) made absolute against `base_dir`."""
    return store if is_remote(store) else absolute_path(local_path(store), base_dir)
