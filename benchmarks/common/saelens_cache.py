"""SAELens' cache job (CacheActivationsRunner) as the peer benchmarks time it: bench_peers_cache
compares it with ours, bench_peers_sweep trains SAELens' SAEs from what it writes.

Imports SAELens: only the peers' environment (.venv-peers) can import this module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

from benchmarks.common.helpers import dir_bytes, timed
from benchmarks.common.peer_fixture import saelens_hook_name


class SAELensCache:
    """CacheActivationsRunner over our token set (pre-tokenized), through HookedProxyLM (the
    AutoModelForCausalLM path: no TransformerLens conversion, the same Hugging Face forward)."""

    def __init__(self, out: Path, lm, dataset, *, tokens: int, dtype: str, batch: int,
                 shard_tokens: int):
        self.out, self.dataset = out, dataset
        bytes_per_token = lm.recipe.d_model * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        # its "buffer" is one shard; + half a token against float rounding in its int(gb * 1e9)
        gb = (shard_tokens * bytes_per_token + bytes_per_token // 2) / 1e9
        self.kw = {"dataset_path": str(out / "unused"), "model_name": str(lm.path),
                   "model_class_name": "AutoModelForCausalLM", "hook_name": saelens_hook_name(lm),
                   "d_in": lm.recipe.d_model, "context_size": lm.recipe.context_length,
                   "model_batch_size": batch, "training_tokens": tokens, "buffer_size_gb": gb,
                   "dtype": dtype, "device": "cpu", "prepend_bos": False,
                   "new_cached_activations_path": str(out)}

    def reset(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)

    def job(self) -> None:
        CacheActivationsRunner(CacheActivationsRunnerConfig(**self.kw), override_dataset=self.dataset).run()

    def run(self) -> float:
        self.reset()
        return timed(self.job)[0]

    def bytes_on_disk(self) -> int:
        return dir_bytes(self.out)
