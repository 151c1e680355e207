"""Checks every stage's config section uses: names, sizes, paths, and advice for values people type.

Each stage validates its own section with these, so a bad key reads the same whichever stage owns it.
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping

from pipeline.locations import absolute_path
from pipeline.typed_config import join_key, problem, show

__all__ = ["ADVICE", "absolute_path", "check_name", "check_size", "have"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# Bad literal values people actually type, with why they are refused.
ADVICE: Mapping[str, str] = types.MappingProxyType({
    **dict.fromkeys(("float16", "fp16", "half", "f16"),
                    "float16 overflows on real residual streams; use bfloat16"),
    **dict.fromkeys(("bf16", "bfloat"), "spell it 'bfloat16'"),
    **dict.fromkeys(("fp32", "f32", "float", "single"), "spell it 'float32'"),
})


def have(values: dict, *names: str) -> bool:
    """Whether all these fields converted, so a cross-field check can trust them."""
    return all(n in values for n in names)


def check_name(value: str, where: str, errors: list[str], what: str) -> None:
    if not value:
        problem(errors, where, "is empty", f"give the {what} a name of letters, digits, '-', '_', '.'")
    elif not _NAME.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _NAME.fullmatch(c)}))
        problem(errors, where, f"{show(value)} contains {show(bad)}",
                 "use only letters, digits, '-', '_' and '.': the name labels files in the store")
    elif set(value) == {"."}:
        problem(errors, where, f"{show(value)} is only dots, which names a folder above the outputs",
                f"give the {what} a name with a letter or digit")


def check_size(values: dict, key: str, where: str, errors: list[str], minimum: int, why: str) -> bool:
    """Whether `key` is present and at least `minimum`; negative sizes get their own message."""
    if key not in values:
        return False
    v = values[key]
    if v < 0:
        problem(errors, join_key(where, key), f"is negative ({v})", f"it is a size: {why}")
    elif v < minimum:
        problem(errors, join_key(where, key), f"is {v}", why)
    return v >= minimum
