"""The normalization rule: the scale that makes the mean norm of stored rows sqrt(d_model).

Stored values are `raw * scale` (storage_layout.md, Normalization). The cache job, the importer
of foreign caches and the synthetic generator estimate the mean norm of their own rows in their
own ways, but they must turn it into a scale by one rule, rounded the same way, or arrays made by
different writers would not be comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# the `normalization` attribute: the rule in a sentence, with the rows left out of the estimate
NORMALIZATION = ("stored = raw * scale; mean L2 norm of stored rows ~= sqrt(d_model), "
                 "position 0 of each sequence excluded from the estimate")
NORMALIZATION_IMPORTED = ("stored = raw * scale; mean L2 norm of stored rows ~= sqrt(d_model), "
                          "sequence starts excluded from the estimate")


def normalization_scale(d_model: int, mean_norm: float, invalid: Callable[[float], Exception]) -> float:
    """sqrt(d_model) / mean_norm, rounded to float32 so that x * s means the same thing on every
    device. A mean norm that is not finite and positive (non-finite or all-zero rows) raises
    `invalid(mean_norm)`: each caller says where its rows came from."""
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise invalid(mean_norm)
    return float(torch.tensor(math.sqrt(d_model) / mean_norm, dtype=torch.float32))
