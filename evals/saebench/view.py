"""An SAE as these evaluations see it: a function from [b, d_model] inputs to [b, n_latents] codes
and one decoder direction per latent, whatever the architecture (trainer/architectures.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class NotAnSAE(ValueError):
    """Absorption and sparse probing read one model's activations: a crosscoder has no such input."""


@dataclass
class SaeView:
    encode_fn: Callable[[Tensor], Tensor]  # [b, d] -> [b, n_latents]
    decoder: Tensor  # [n_latents, d]: latent j writes f_j * decoder[j]

    @property
    def n_latents(self) -> int:
        return self.decoder.shape[0]

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @classmethod
    def of(cls, dictionary) -> SaeView:
        """The view of a trained one-model dictionary (eval mode: BatchTopK uses its threshold)."""
        if dictionary.n_models != 1:
            raise NotAnSAE(f"a {dictionary.n_models}-model crosscoder: absorption and sparse probing "
                           "evaluate SAEs (one model's activations in, one model's out)")
        dictionary.eval()
        return cls(lambda x: dictionary.encode(x[:, None, :]), dictionary.W_dec.detach()[:, 0, :])

    @torch.inference_mode()
    def codes(self, x: Tensor, *, latents: Tensor | None = None, batch_rows: int = 4096) -> Tensor:
        """[n, n_latents] codes of x [n, d] (or only the columns `latents`), float32 on x's device,
        encoded batch by batch on the dictionary's device."""
        out = []
        for lo in range(0, x.shape[0], batch_rows):
            f = self.encode_fn(x[lo:lo + batch_rows].to(self.device, torch.float32)).float()
            out.append((f if latents is None else f[:, latents.to(f.device)]).to(x.device))
        if not out:
            width = self.n_latents if latents is None else len(latents)
            return torch.zeros(0, width, device=x.device)
        return torch.cat(out)
