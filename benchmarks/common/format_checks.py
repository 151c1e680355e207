"""What the two format conformance checks share (check_saelens_format,
check_dictionary_learning_format): the sizes, the tolerance, the raw activations, our side of the
comparison and the printed row."""

from __future__ import annotations

import torch

D, M, B, SCALE = 64, 256, 512, 0.37
TOLERANCE = 1e-5


def raw_activations(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g) * 3 + torch.randn(D, generator=g) * 2


def ours_raw(dictionary, x: torch.Tensor) -> torch.Tensor:
    """Our dictionary (store units) applied to raw activations, reconstruction in raw units."""
    s = dictionary.scales[0]
    with torch.no_grad():
        return dictionary.decode(dictionary.encode(x[:, None] * s))[:, 0] / s


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, fired: float) -> dict:
    diff = float((got - ref).abs().max())
    row = {"case": name, "max_abs_diff": diff, "max_abs_value": float(ref.abs().max()),
           "relative": diff / float(ref.abs().max()), "active_fraction": fired}
    print(f"{name:<40} max|diff| {diff:.3e}  (max|x_hat| {row['max_abs_value']:.2f}, relative "
          f"{row['relative']:.1e}, latents active {fired:.1%})")
    return row
