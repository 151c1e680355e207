"""Helpers several test packages share (public names only)."""

from __future__ import annotations


def leaf_paths(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested config a mutation can hit, containers included."""
    out = [prefix] if prefix else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out += leaf_paths(v, prefix + (k,))
    return out
