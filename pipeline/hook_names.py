"""Hook names of other toolkits and ours: what a foreign dictionary or cache says it was made at.

TransformerLens (SAELens, the crosscoder replications) calls the residual stream entering block L
`blocks.L.hook_resid_pre` and leaving it `blocks.L.hook_resid_post`: our `layerL.resid_pre` (the
input of decoder layer L) and `layerL.resid_post` (its output). Other hook points (attention,
MLP, resid_mid) have no counterpart here.
"""

from __future__ import annotations

import re

from pipeline.config import HookSpec

_TL_HOOK = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|post)")
_LABEL = re.compile(r"layer(\d+)\.(resid_pre|resid_post)")


def from_transformerlens(name: str | None) -> str | None:
    """`blocks.L.hook_resid_pre|post` -> `layerL.resid_pre|post`; None for any other hook point."""
    match = _TL_HOOK.fullmatch(name or "")
    return f"layer{match.group(1)}.resid_{match.group(2)}" if match else None


def parse_label(label: str | None) -> HookSpec | None:
    """`layerL.resid_pre|post` -> HookSpec; None when it is not one."""
    match = _LABEL.fullmatch(label or "")
    return HookSpec(int(match.group(1)), match.group(2)) if match else None


def to_transformerlens(label: str) -> str:
    """`layerL.resid_pre|post` -> `blocks.L.hook_resid_pre|post`."""
    hook = parse_label(label)
    if hook is None:
        raise ValueError(f"hook {label!r} is not layer<L>.resid_pre or layer<L>.resid_post")
    return f"blocks.{hook.layer}.hook_{hook.site}"
