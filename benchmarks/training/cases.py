"""The cases `benchmarks.bench_train` times step by step: our training step and the peers' on the
same tensors (dictionary_learning's trainers, SAELens' `SAETrainer`), the synthetic data they share,
and the round-by-round interleaving that times them.

Imports the peer toolkits: run in the peers' environment (.venv-peers); elsewhere importing this
module exits with the command that builds that environment.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from benchmarks.common.helpers import peers_missing
from trainer.config import DictionarySpec, TrainSpec
from trainer.train import new_member, train_step

try:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer
    from dictionary_learning.training import trainSAE
    from sae_lens import (
        LoggingConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
except ImportError as e:  # pragma: no cover - the peers' environment is a separate venv
    sys.exit(peers_missing(e, "bench_train"))

HUGE = 10**9  # "total steps" for the schedules: no decay anywhere in the timed window


# -- data -----------------------------------------------------------------------------------------
def make_pool(n_batches: int, batch: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    """Activation-like float32 data: a mean offset, a few strong directions, then unit mean
    squared norm (the scale dictionary_learning normalizes to; ours trains on scaled data too)."""
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None]
    x = torch.randn(n, d, generator=g) @ mix + 0.5 * torch.randn(d, generator=g)
    x = x / x.pow(2).sum(1).mean().sqrt()
    return [b.contiguous() for b in x.split(batch)]


# -- the two sides' steps -------------------------------------------------------------------------
def train_spec(lr: float, **kw) -> TrainSpec:
    return TrainSpec(dictionaries=[], steps=HUGE, lr=lr, lr_warmup_steps=0, lr_decay_fraction=0.0,
                     grad_clip=1.0, **kw)


class Ours:
    """n dictionaries of ours, stepped in lockstep on one batch as run_train does (n=1: one SAE)."""

    side = "ours"

    def __init__(self, arch: str, d: int, latents: int, k: int, lr: float, n: int = 1,
                 aux_every_step: bool = False, l1: float = 1.0):
        self.train = train_spec(lr, dead_after_tokens=0 if aux_every_step else 10_000_000)
        specs = [DictionarySpec(name=f"{arch}{i}", architecture=arch, n_latents=latents,
                                k=k if arch in ("topk", "batchtopk") else None,
                                l1_coefficient=l1, seed=i) for i in range(n)]
        self.members = [new_member(s, self.train, 1, d, [1.0], "cpu") for s in specs]
        self.step_i = 0

    def step(self, x: torch.Tensor) -> None:
        x = x.view(x.shape[0], 1, x.shape[1])  # [batch, n_models=1, d_model], no copy
        for m in self.members:
            train_step(m, x, self.step_i, self.train)
        self.step_i += 1


class OursPared(Ours):
    """Diagnostic, not shipped: ours with the TopK SAE loss cut down to what the peer computes.

    The same parameters, optimizer, `train_step`, encoder (`pre_activations`) and decoder
    (`decode`), but the loss returns the MSE only: no per-step FVU/L0 metrics, no AuxK call
    (nothing is dead in these runs), and the fired latents come from the top-k indices (as the
    peer's do) instead of a pass over the [batch, latents] codes. It shows how much of any gap
    is that extra per-step work rather than the step's mechanics.
    """

    def step(self, x: torch.Tensor) -> None:
        cls = type(self.members[0].model)
        had = "loss" in cls.__dict__
        saved = cls.__dict__.get("loss")
        cls.loss = _pared_topk_loss
        try:
            super().step(x)
        finally:
            if had:
                cls.loss = saved
            else:
                del cls.loss


def _pared_topk_loss(self, x, *, k=None, l1_coefficient=None, dead_mask=None):
    pre = self.pre_activations(x)
    idx = pre.topk(self._k(k), dim=1, sorted=False).indices  # SAE: unit-norm decoder, rank = pre
    f = torch.zeros_like(pre).scatter_(1, idx, torch.relu(pre.gather(1, idx)))
    x_hat = self.decode(f)
    mse = (x - x_hat).pow(2).sum((1, 2)).mean()
    fired = torch.zeros(self.n_latents, dtype=torch.bool, device=pre.device)
    fired[idx.flatten()] = True
    return mse, {"f": f.detach(), "fired": fired}


class Peer:
    """One dictionary_learning trainer, driven through `update(step, x)` as trainSAE does."""

    side = "dl"

    def __init__(self, arch: str, d: int, latents: int, k: int, lr: float, seed: int = 0,
                 aux_every_step: bool = False, l1: float = 1.0):
        self.trainer = peer_trainer(arch, d, latents, k, lr, seed, aux_every_step, l1)
        self.step_i = 0

    def step(self, x: torch.Tensor) -> None:
        self.trainer.update(self.step_i, x)
        self.step_i += 1


def peer_config(arch: str, d: int, latents: int, k: int, lr: float, seed: int, l1: float) -> dict:
    common = {"steps": HUGE, "activation_dim": d, "dict_size": latents, "layer": 0,
              "lm_name": "bench", "lr": lr, "warmup_steps": 0, "seed": seed, "device": "cpu"}
    if arch == "topk":
        # threshold tracking on from the start, as in the steady state of a run past step 1000
        return dict(trainer=TopKTrainer, k=k, threshold_start_step=0, **common)
    if arch == "batchtopk":
        return dict(trainer=BatchTopKTrainer, k=k, threshold_start_step=0, **common)
    if arch == "relu":
        return dict(trainer=StandardTrainer, l1_penalty=l1, sparsity_warmup_steps=None, **common)
    raise ValueError(arch)


def peer_trainer(arch, d, latents, k, lr, seed, aux_every_step=False, l1=1.0):
    cfg = peer_config(arch, d, latents, k, lr, seed, l1)
    cls = cfg.pop("trainer")
    tr = cls(**cfg)
    if aux_every_step:
        tr.dead_feature_threshold = 0  # every latent counts as dead: AuxK runs every step
        tr.top_k_aux = 2 * k  # both default to d_model // 2; set explicitly to 2k (= d_model // 2 here)
    return tr


class SAELensPeer:
    """n SAELens trainers (n=1: one SAE), each stepped by `SAETrainer.step(x)` and its step counter
    advanced, as `SAETrainer.fit` does per batch; for n > 1 exactly the loop body of its
    `MultiSAETrainer.fit` (one shared batch, one trainer after the other)."""

    side = "saelens"

    def __init__(self, arch: str, d: int, latents: int, k: int, lr: float, n: int = 1,
                 aux_every_step: bool = False, l1: float = 1.0, batch: int = 4096):
        cfg = SAETrainerConfig(total_training_samples=HUGE * batch, train_batch_size_samples=batch,
                               lr=lr, lr_end=lr, lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999,
                               device="cpu", dead_feature_window=1000, feature_sampling_window=HUGE,
                               logger=LoggingConfig(log_to_wandb=False))
        self.trainers = []
        for seed in range(n):
            torch.manual_seed(seed)
            if arch == "topk":
                sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=latents, k=k, device="cpu"))
            elif arch == "relu":
                sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=latents,
                                                                    l1_coefficient=l1, device="cpu"))
            else:
                raise ValueError(arch)
            tr = SAETrainer(cfg, sae, data_provider=iter(()))
            if aux_every_step:  # every latent counts as dead: AuxK (k_aux = d_in // 2) every step
                tr.n_forward_passes_since_fired.fill_(float(HUGE))
            self.trainers.append(tr)
        self.aux_every_step = aux_every_step

    def step(self, x: torch.Tensor) -> None:
        for tr in self.trainers:
            tr.step(x)
            tr.n_training_steps += 1
            if self.aux_every_step:  # the step reset the latents that fired; keep them all dead
                tr.n_forward_passes_since_fired.fill_(float(HUGE))


# -- timing ---------------------------------------------------------------------------------------
class PeerLockstep:
    """dictionary_learning's own lockstep: one `trainSAE` call with n TopK trainer configs.

    trainSAE runs to the end in one call, so the rounds of the other cases run inside its data
    generator: before handing trainSAE batch r, the generator runs round r of every other case, then
    stamps the time; trainSAE's step r (all n trainers) lasts until it asks for batch r + 1.
    """

    side = "dl"

    def __init__(self, d, latents, k, lr, n):
        self.configs = [peer_config("topk", d, latents, k, lr, seed=s, l1=1.0) for s in range(n)]


def run_rounds(name: str, cases: dict, pool, *, rounds: int, warmup: int, log) -> dict:
    """Step-level interleaving: each round runs one step of every case on the same batch, the
    order reversed every other round, so neighbouring steps of ours and the peer's share the
    machine's load. Returns name -> [(wall s, CPU s, minor page faults)] of the timed rounds."""
    lockstep = [k for k, c in cases.items() if isinstance(c, PeerLockstep)]
    steppers = [k for k in cases if k not in lockstep]
    times = {k: [] for k in cases}
    t0 = time.perf_counter()

    def one_round(r: int) -> None:
        x = pool[r % len(pool)]
        for key in (steppers if r % 2 == 0 else steppers[::-1]):
            w0, c0, f0 = time.perf_counter(), time.process_time(), _faults()
            cases[key].step(x)
            if r >= warmup:
                times[key].append((time.perf_counter() - w0, time.process_time() - c0,
                                   _faults() - f0))
        if r >= warmup and (r - warmup + 1) % max(1, rounds // 4) == 0:
            log(f"  [{name}] round {r - warmup + 1}/{rounds} ({time.perf_counter() - t0:.0f} s)")

    total = warmup + rounds
    if not lockstep:
        for r in range(total):
            one_round(r)
        return times
    (key,) = lockstep

    def data():
        start = None
        for r in range(total + 1):
            if start is not None and r - 1 >= warmup:  # trainSAE just finished its step r - 1
                times[key].append((time.perf_counter() - start[0], time.process_time() - start[1],
                                   _faults() - start[2]))
            if r < total:
                one_round(r)
            start = (time.perf_counter(), time.process_time(), _faults())
            yield pool[r % len(pool)]

    configs = [dict(c) for c in cases[key].configs]  # trainSAE pops "trainer" from each
    trainSAE(data=data(), trainer_configs=configs, steps=total, device="cpu",
             normalize_activations=False, use_wandb=False, save_dir=None)
    return times


def _faults() -> int:
    """Minor page faults of this process so far (fresh memory touched: large temporaries)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarize(times: list[tuple[float, float, int]], tokens_per_step: int) -> dict:
    return {"tokens_per_s": tokens_per_step / statistics.median(t[0] for t in times),
            "cpu_s_per_step": statistics.median(t[1] for t in times),
            "minor_faults_per_step": statistics.median(t[2] for t in times),
            "step_wall_s": [t[0] for t in times], "step_cpu_s": [t[1] for t in times],
            "step_minor_faults": [t[2] for t in times]}
