"""Stage-two training benchmark: our training step vs dictionary_learning's and SAELens', on the same
tensors.

Run it with the peers' environment (the project plus the peer toolkits, apart from .venv):

    bash benchmarks/peer_env.sh && .venv-peers/bin/python benchmarks/bench_train.py

What is measured (float32 synthetic activations, the very same tensors for both sides, batch 4,096,
k 32, Adam with the same lr and betas, no lr warm-up, torch.set_num_threads(2) for both):

  * one training step, ours (`trainer.train._train_step`, the step `mdiff train` runs) vs
    dictionary_learning's trainer `update(step, x)` (what its `trainSAE` calls), for
    TopK (AutoEncoderTopK / TopKTrainer), ReLU + L1 (AutoEncoder / StandardTrainer),
    BatchTopK (BatchTopKSAE / BatchTopKTrainer), and TopK with AuxK running every step
    (every latent counted dead), at d_model 128 and (TopK) 512, 2,048 latents
    (16,384 with --large-latents); and vs SAELens' `SAETrainer.step(x)` (what its `fit` and its
    `MultiSAETrainer` call) for TopK (TopKTrainingSAE), standard L1 (StandardTrainingSAE) and TopK
    with AuxK every step; plus a diagnostic, not shipped: our step with the TopK loss pared down
    to dictionary_learning's work, to show where any gap comes from;
  * lockstep, in memory: 4 TopK dictionaries (seeds 0-3) fed the same batch each step, ours
    (the loop of `run_train`) vs dictionary_learning's `trainSAE` with 4 trainer configs and vs
    4 SAELens trainers stepped as its `MultiSAETrainer.fit` steps them, and each against one
    dictionary;
  * lockstep end to end through our loader: a small bfloat16 store (pipeline.store), a sweep of 4
    reading it once vs 4 separate single runs each reading it, page cache dropped before each run
    (as for a store larger than RAM), with the time spent waiting for data split out.

Warm-up rounds are not timed (the first steps allocate Adam state; dictionary_learning's step 0
computes a geometric median). Cases are interleaved step by step: each round runs one step of every
case on the same batch, the order reversed every other round (trainSAE, which owns its loop, steps
between rounds through its data generator). tokens/s = batch / median step time; every ratio is the
median over rounds of the ratio measured within one round. Both wall-clock and process CPU time are
recorded: the machine is shared, and the CPU-time ratio is the steadier of the two when other jobs
compete for the 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # trainSAE's progress bar
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from bench_cache import write_section
from bench_helpers import drop_page_cache

from pipeline import store as S
from trainer.config import DictionarySpec, TrainSpec
from trainer.loader import ActivationLoader
from trainer.train import _new_member, _train_step

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
    sys.exit(f"a peer toolkit is not importable ({e}); run with the peers' environment:\n"
             "  bash benchmarks/peer_env.sh && .venv-peers/bin/python benchmarks/bench_train.py")

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
        self.members = [_new_member(s, self.train, 1, d, [1.0], "cpu") for s in specs]
        self.step_i = 0

    def step(self, x: torch.Tensor) -> None:
        x = x.view(x.shape[0], 1, x.shape[1])  # [batch, n_models=1, d_model], no copy
        for m in self.members:
            _train_step(m, x, self.step_i, self.train)
        self.step_i += 1


class OursPared(Ours):
    """Diagnostic, not shipped: ours with the TopK SAE loss cut down to what the peer computes.

    The same parameters, optimizer, `_train_step`, encoder (`pre_activations`) and decoder
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
        tr.top_k_aux = 2 * k  # ours uses aux_k = 2k; theirs defaults to d_model // 2
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


def paired_ratio(num: list[tuple], den: list[tuple], i: int) -> float:
    """Median over rounds of num/den, measured in the same round (i: 0 wall, 1 CPU time)."""
    return statistics.median(a[i] / b[i] for a, b in zip(num, den, strict=True))


def summarize(times: list[tuple[float, float, int]], tokens_per_step: int) -> dict:
    return {"tokens_per_s": tokens_per_step / statistics.median(t[0] for t in times),
            "cpu_s_per_step": statistics.median(t[1] for t in times),
            "minor_faults_per_step": statistics.median(t[2] for t in times),
            "step_wall_s": [t[0] for t in times], "step_cpu_s": [t[1] for t in times],
            "step_minor_faults": [t[2] for t in times]}


# -- end to end through our loader ----------------------------------------------------------------
HOOK = "bench.resid_post"


def build_store(path: Path, *, tokens: int, d: int, ctx: int, chunk: int, shard: int):
    """One model's bfloat16 activations at one hook, written through pipeline.store."""
    shutil.rmtree(path, ignore_errors=True)
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = tokens // ctx
    tsid = "ts-bench-train"
    S.write_token_set(root, tsid, n_seq, ctx,
                      [(np.zeros((n_seq, ctx), np.int32), np.zeros(n_seq, np.uint8))],
                      {"n_train_sequences": n_seq, "context_length": ctx})
    ts = S.open_token_set(root, tsid)
    arr = S.create_activation_array(
        root, S.activation_path(tsid, "bench-model", HOOK), n_rows=n_seq * ctx, d_model=d,
        chunk_rows=chunk, shard_rows=shard, storage_dtype="bfloat16", compression="none",
        attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx, "hook": {"label": HOOK}})
    pool = make_pool(1, min(shard, n_seq * ctx), d, seed=1)[0]
    g = torch.Generator().manual_seed(2)
    for s in range(arr.n_shards):
        lo, hi = arr.shard_rows_range(s)
        rows = pool[torch.randperm(len(pool), generator=g)[: hi - lo]]
        arr.write_shard(s, S.encode(rows, "bfloat16"))
    assert arr.finalize()
    os.sync()  # clean pages, so that drop_cache can evict them
    files = [str(p) for p in (path / S.activation_path(tsid, "bench-model", HOOK) / "c").rglob("*")
             if p.is_file()]
    return ts, [arr], files


def drop_cache(files: list[str]) -> str:
    """Evict the store's pages from the page cache: POSIX_FADV_DONTNEED on each of its files.

    Only our files: a system-wide drop_caches would also stall the other jobs on this shared
    machine, and a run right after one would get the cores to itself (it skews the comparison).
    """
    drop_page_cache(files)
    return "posix_fadvise(DONTNEED) on the store's files"


def e2e_run(arrays, ts, files, *, seeds: list[int], steps: int, d: int, latents: int, k: int,
            lr: float, batch: int, buffer_tokens: int, read_threads: int) -> dict:
    """One training run as run_train does it: a fresh loader (cold page cache) feeding
    len(seeds) fresh TopK dictionaries in lockstep for `steps` steps. Time waiting for data
    (loader construction, next(), bfloat16 -> float32) is split out."""
    drop_cache(files)
    train = dataclasses.replace(train_spec(lr), batch_size=batch, buffer_tokens=buffer_tokens,
                                read_threads=read_threads)
    w0, c0 = time.perf_counter(), time.process_time()
    members = [_new_member(DictionarySpec(name=f"t{s}", architecture="topk", n_latents=latents,
                                          k=k, seed=s), train, 1, d, [1.0], "cpu") for s in seeds]
    t = time.perf_counter()
    loader = ActivationLoader(arrays, ts, split="train", batch_size=batch, seed=0,
                              buffer_tokens=buffer_tokens, read_threads=read_threads, device="cpu")
    batches = iter(loader)
    data_s = time.perf_counter() - t
    for step in range(steps):
        t = time.perf_counter()
        x = next(batches).float()
        data_s += time.perf_counter() - t
        for m in members:
            _train_step(m, x, step, train)
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    loader.close()
    return {"wall_s": wall, "cpu_s": cpu, "data_s": data_s, "steps": steps,
            "dictionaries": len(seeds)}


def run_e2e(args, d: int, log) -> dict:
    work = Path(args.work)
    tokens = args.e2e_store_batches * args.batch
    t0 = time.perf_counter()
    ts, arrays, files = build_store(work / "store", tokens=tokens, d=d, ctx=128, chunk=4096,
                                    shard=65536)
    build_s = time.perf_counter() - t0
    kw = {"steps": args.e2e_steps, "d": d, "latents": args.latents, "k": args.k, "lr": args.lr,
          "batch": args.batch, "buffer_tokens": args.e2e_buffer_tokens,
          "read_threads": args.read_threads}
    n = args.sweep
    runs = {"lockstep": [], "separate": []}
    cache_drop = ""
    for rep in range(args.e2e_repeats):
        order = ["lockstep", "separate"] if rep % 2 == 0 else ["separate", "lockstep"]
        for mode in order:
            if mode == "lockstep":
                r = e2e_run(arrays, ts, files, seeds=list(range(n)), **kw)
            else:
                parts = [e2e_run(arrays, ts, files, seeds=[s], **kw) for s in range(n)]
                r = {key: sum(p[key] for p in parts) for key in ("wall_s", "cpu_s", "data_s")}
                r.update(steps=args.e2e_steps, dictionaries=n, runs=parts)
            runs[mode].append(r)
            log(f"  [e2e {rep + 1}/{args.e2e_repeats}] {mode}: {r['wall_s']:.1f} s wall, "
                f"{r['data_s']:.2f} s waiting for data, {r['cpu_s']:.1f} CPU-s")
        cache_drop = drop_cache(files)
    med = {m: {key: statistics.median(r[key] for r in rs) for key in ("wall_s", "cpu_s", "data_s")}
           for m, rs in runs.items()}
    shutil.rmtree(work, ignore_errors=True)
    return {"d_model": d, "store_tokens": tokens, "storage_dtype": "bfloat16",
            "store_bytes": tokens * d * 2, "build_s": build_s, "cache_drop": cache_drop,
            "buffer_tokens": args.e2e_buffer_tokens, "read_threads": args.read_threads,
            "steps_per_run": args.e2e_steps, "sweep": n, "runs": runs, "median": med,
            # paired: lockstep and separate of the same repeat, then the median over repeats
            "ratio_wall_lockstep_vs_separate": statistics.median(
                a["wall_s"] / b["wall_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True)),
            "ratio_cpu_lockstep_vs_separate": statistics.median(
                a["cpu_s"] / b["cpu_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True)),
            "data_s_saved": statistics.median(
                b["data_s"] - a["data_s"] for a, b in zip(runs["lockstep"], runs["separate"], strict=True))}


# -- main -----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-model-large", type=int, default=512, help="TopK only; 0 to skip")
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--large-latents", type=int, default=0,
                    help="also TopK at this many latents (e.g. 16384; slow on CPU)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--rounds", type=int, default=12,
                    help="timed rounds (one step of every case each) at --d-model")
    ap.add_argument("--rounds-large", type=int, default=6, help="timed rounds for the larger settings")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--sweep", type=int, default=4, help="dictionaries in the lockstep cases")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end loader sweep")
    ap.add_argument("--e2e-steps", type=int, default=4)
    ap.add_argument("--e2e-store-batches", type=int, default=32)
    ap.add_argument("--e2e-buffer-tokens", type=int, default=16384)
    ap.add_argument("--read-threads", type=int, default=4)
    ap.add_argument("--work", default="/tmp/mdiff-bench-train")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "train.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    groups = {}
    k, lr, n = args.k, args.lr, args.sweep
    d = args.d_model
    pool = make_pool(4, args.batch, d)
    log(f"d_model {d}, {args.latents} latents: building")
    cases = {
        "topk/ours": Ours("topk", d, args.latents, k, lr),
        "topk/dl": Peer("topk", d, args.latents, k, lr),
        "topk/saelens": SAELensPeer("topk", d, args.latents, k, lr, batch=args.batch),
        "topk_pared/ours": OursPared("topk", d, args.latents, k, lr),
        "relu/ours": Ours("relu", d, args.latents, k, lr),
        "relu/dl": Peer("relu", d, args.latents, k, lr),
        "relu/saelens": SAELensPeer("relu", d, args.latents, k, lr, batch=args.batch),
        "batchtopk/ours": Ours("batchtopk", d, args.latents, k, lr),
        "batchtopk/dl": Peer("batchtopk", d, args.latents, k, lr),
        "topk_auxk/ours": Ours("topk", d, args.latents, k, lr, aux_every_step=True),
        "topk_auxk/dl": Peer("topk", d, args.latents, k, lr, aux_every_step=True),
        "topk_auxk/saelens": SAELensPeer("topk", d, args.latents, k, lr, aux_every_step=True,
                                         batch=args.batch),
        f"lockstep{n}/ours": Ours("topk", d, args.latents, k, lr, n=n),
        f"lockstep{n}/dl": PeerLockstep(d, args.latents, k, lr, n),
        f"lockstep{n}/saelens": SAELensPeer("topk", d, args.latents, k, lr, n=n, batch=args.batch),
    }
    # warm-up rounds first: Adam's state, the peer's geometric median at its step 0
    times = run_rounds(f"d{d}", cases, pool, rounds=args.rounds, warmup=args.warmup, log=log)
    groups[f"d{d}"] = {"d_model": d, "latents": args.latents,
                       "cases": {key: summarize(v, args.batch) for key, v in times.items()}}
    del cases, pool

    large = []
    if args.d_model_large:
        large.append((args.d_model_large, args.latents))
    if args.large_latents:
        large.append((d, args.large_latents))
    for dl, ml in large:
        pool = make_pool(4, args.batch, dl)
        log(f"d_model {dl}, {ml} latents: building")
        cases = {"topk/ours": Ours("topk", dl, ml, k, lr), "topk/dl": Peer("topk", dl, ml, k, lr),
                 "topk/saelens": SAELensPeer("topk", dl, ml, k, lr, batch=args.batch)}
        times = run_rounds(f"d{dl}-m{ml}", cases, pool, rounds=args.rounds_large,
                           warmup=args.warmup, log=log)
        groups[f"d{dl}" if ml == args.latents else f"d{dl}_m{ml}"] = {
            "d_model": dl, "latents": ml,
            "cases": {key: summarize(v, args.batch) for key, v in times.items()}}
        del cases, pool

    e2e = None
    if not args.no_e2e:
        log(f"end to end: a sweep of {n} through the loader vs {n} separate runs")
        e2e = run_e2e(args, d, log)

    from importlib.metadata import version
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "dictionary_learning": version("dictionary-learning"),
                    "sae_lens": version("sae-lens"),
                    **_git_state(),
                    "numpy": np.__version__},
        "setup": {"batch": args.batch, "k": k, "lr": lr, "adam_betas": [0.9, 0.999],
                  "rounds": args.rounds, "rounds_large": args.rounds_large,
                  "warmup_rounds": args.warmup, "e2e_repeats": args.e2e_repeats, "sweep": n,
                  "data": "synthetic float32, unit mean squared norm, 4 batches cycled"},
        "groups": groups,
        "e2e": e2e,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "seconds": time.perf_counter() - t_start,
    }
    derive(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    body = render(result)
    write_section(Path(args.out), "train", body)
    print(body)
    log("done")


def _git_state() -> dict:
    """The commit measured, and whether trainer/ differed from it (read-only git calls)."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=False,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "trainer", "pipeline")
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "trainer_dirty": " plus uncommitted changes to trainer/ or pipeline/" if dirty else ""}


PEERS = ("dl", "saelens")
PEER_NAMES = {"dl": "dictionary_learning", "saelens": "SAELens"}


def derive(r: dict) -> None:
    """Paired ratios (median over rounds of the ratio within each round): ours/peer in tokens/s
    (= peer step time / ours) by wall clock and by CPU time; lockstep step time over one."""
    n = r["setup"]["sweep"]

    def pairs(case):
        return list(zip(case["step_wall_s"], case["step_cpu_s"], strict=True))

    for g in r["groups"].values():
        c = g["cases"]
        g["ratios"] = {}
        for key in c:
            what, side = key.split("/")
            if side != "ours":
                continue
            for peer in PEERS:
                if what == "topk_pared" and peer != "dl":
                    continue  # the diagnostic is pared down to dictionary_learning's step
                peer_key = f"topk/{peer}" if what == "topk_pared" else f"{what}/{peer}"
                if peer_key in c:
                    o, p = pairs(c[key]), pairs(c[peer_key])
                    g["ratios"][f"{what}/{peer}"] = {"ours_over_peer_tokens_per_s": paired_ratio(p, o, 0),
                                                     "peer_over_ours_cpu_s": paired_ratio(p, o, 1)}
        if f"lockstep{n}/ours" in c:
            for side in ("ours", *PEERS):
                if f"lockstep{n}/{side}" in c:
                    one, many = pairs(c[f"topk/{side}"]), pairs(c[f"lockstep{n}/{side}"])
                    g["ratios"][f"lockstep{n}_time_over_one_{side}"] = paired_ratio(many, one, 0)
                    g["ratios"][f"lockstep{n}_cpu_over_one_{side}"] = paired_ratio(many, one, 1)


def render(r: dict) -> str:
    m, s, n = r["machine"], r["setup"], r["setup"]["sweep"]
    labels = {"topk": "TopK SAE",
              "topk_pared": "*diagnostic:* ours with the per-step metrics taken out of the TopK "
                            "loss (MSE only, fired latents from the top-k indices; not shipped)",
              "relu": "ReLU + L1 SAE",
              "batchtopk": "BatchTopK SAE",
              "topk_auxk": "TopK with AuxK every step (all latents counted dead; aux_k 64 everywhere)",
              f"lockstep{n}": f"{n} TopK SAEs in lockstep on one batch"}
    peer_labels = {("topk", "dl"): "TopKTrainer", ("topk_pared", "dl"): "TopKTrainer",
                   ("relu", "dl"): "StandardTrainer", ("batchtopk", "dl"): "BatchTopKTrainer",
                   ("topk_auxk", "dl"): "TopKTrainer", (f"lockstep{n}", "dl"): f"`trainSAE`, {n} configs",
                   ("topk", "saelens"): "TopKTrainingSAE", ("relu", "saelens"): "StandardTrainingSAE",
                   ("topk_auxk", "saelens"): "TopKTrainingSAE",
                   (f"lockstep{n}", "saelens"): f"{n} `SAETrainer`s, as `MultiSAETrainer` steps them"}
    rows = []
    slow = []
    for g in r["groups"].values():
        c = g["cases"]
        for key, rat in g["ratios"].items():
            if not isinstance(rat, dict):
                continue
            what, peer = key.split("/")
            o, p = c[f"{what}/ours"], c[f"topk/{peer}" if what == "topk_pared" else f"{what}/{peer}"]
            ratio = rat["ours_over_peer_tokens_per_s"]
            rows.append(f"| {labels[what]}, d_model {g['d_model']}, {g['latents']:,} latents | "
                        f"{PEER_NAMES[peer]} {peer_labels[(what, peer)]} | "
                        f"{o['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | **{ratio:.2f}** | "
                        f"{rat['peer_over_ours_cpu_s']:.2f} |")
            if ratio < 0.95 and what != "topk_pared":
                slow.append(f"{what} vs {PEER_NAMES[peer]} at d_model {g['d_model']} ({ratio:.2f})")
    g0 = next(iter(r["groups"].values()))
    lk_ours = g0["ratios"].get(f"lockstep{n}_time_over_one_ours")
    lk_peer = g0["ratios"].get(f"lockstep{n}_time_over_one_dl")
    lk_sl = g0["ratios"].get(f"lockstep{n}_time_over_one_saelens")
    la = r["load_average"]
    lockstep_text = ""
    if lk_ours is not None:
        lockstep_text = f"""
**Lockstep, in memory** (d_model {g0['d_model']}): a step of {n} dictionaries takes **{lk_ours:.2f}x** the
time of one for ours ({lk_peer:.2f}x for dictionary_learning's `trainSAE`, {lk_sl:.2f}x for SAELens' trainers). On a CPU the arithmetic
of {n} dictionaries is {n}x that of one and reading a batch that is already in memory costs nothing,
so about {n}x is the floor here: lockstep cannot bring this under 1.5x on a CPU. What it saves is
reading and preparing the data once instead of {n} times, which the next measurement isolates.
"""
    e2e_text = ""
    e = r.get("e2e")
    if e:
        lm, sm = e["median"]["lockstep"], e["median"]["separate"]
        e2e_text = f"""
**Lockstep, end to end through our loader**: a {e['store_tokens']:,}-token bfloat16 store
(d_model {e['d_model']}, {e['store_bytes'] / 2**20:.0f} MiB) built with `pipeline.store`; page cache dropped
before every run ({e['cache_drop']}), as for a store larger than RAM; loader window
{e['buffer_tokens']:,} tokens, {e['read_threads']} read threads; {e['steps_per_run']} steps per run.

| what | wall s | of which waiting for data | CPU s |
|---|---:|---:|---:|
| sweep of {n} in lockstep, one loader | {lm['wall_s']:.1f} | {lm['data_s']:.2f} | {lm['cpu_s']:.1f} |
| {n} separate runs, one loader each | {sm['wall_s']:.1f} | {sm['data_s']:.2f} | {sm['cpu_s']:.1f} |

Lockstep / separate (paired by repeat, median): **{e['ratio_wall_lockstep_vs_separate']:.2f}** in wall time,
{e['ratio_cpu_lockstep_vs_separate']:.2f} in CPU time. Reading once instead of {n} times saved
{e['data_s_saved']:.2f} s of waiting for data per sweep ({e['data_s_saved'] / sm['wall_s']:.1%} of the separate runs' wall time);
everything else is the same {n} x {e['steps_per_run']} dictionary steps in both modes. On this CPU a token is
{e['d_model'] * 2} bytes to read (~{lm['data_s'] / (e['steps_per_run'] * s['batch']) * 1e6:.1f} µs here, cold cache and loader start included) but
~{1e6 / g0['cases']['topk/ours']['tokens_per_s']:.0f} µs of training per dictionary, so compute dominates and the lockstep saving is small here; it pays where training a
token is cheap next to reading it: on a GPU, or with several models per token (crosscoders) and
stores read from disk or network.
"""
    c0 = g0["cases"]
    faults_ours = c0["topk/ours"]["minor_faults_per_step"]
    faults_peer = c0["topk/dl"]["minor_faults_per_step"]
    big = [g for g in r["groups"].values() if g is not g0 and g["latents"] == g0["latents"]]
    large_note = ""
    if big:
        gb = big[0]
        grow = c0["topk/ours"]["tokens_per_s"] / gb["cases"]["topk/ours"]["tokens_per_s"]
        large_note = (f"; a step at d_model {gb['d_model']} ({gb['d_model'] / g0['d_model']:.0f}x the matmul work, the same "
                      f"[batch, latents] work) takes {grow:.1f}x as long as at {g0['d_model']} (ours, TopK); ours / peer "
                      f"there: {gb['ratios']['topk/dl']['ours_over_peer_tokens_per_s']:.2f} "
                      f"(dictionary_learning), {gb['ratios']['topk/saelens']['ours_over_peer_tokens_per_s']:.2f} (SAELens)")
    slow_text = ("**Where a peer is faster** (ours / peer < 0.95): " + ", ".join(slow) + "."
                 if slow else "No case where a peer is more than 5% faster in this run.")
    pared = g0["ratios"].get("topk_pared/dl")
    if pared:
        pr, tr = pared["ours_over_peer_tokens_per_s"], g0["ratios"]["topk/dl"]["ours_over_peer_tokens_per_s"]
        slow_text += (f" The diagnostic row (our TopK step without the per-step metrics) runs at "
                      f"{pr:.2f}x dictionary_learning's, TopK as shipped at {tr:.2f}x: "
                      + ("the per-step metrics account for the gap." if pr >= 0.95 and pr > tr + 0.05
                         else "the per-step metrics cost little here." if abs(pr - tr) <= 0.05
                         else f"the per-step metrics cost about {1 - tr / pr:.0%} of our step."))
    return f"""## Stage two: training steps vs dictionary_learning and SAELens

Machine: CPU, {m['cpu_count']} cores, {m['torch_threads']} torch threads for both sides; {m['platform']};
Python {m['python']}, torch {m['torch']}, dictionary-learning {m['dictionary_learning']}, sae-lens {m['sae_lens']} (in `.venv-peers`).
Synthetic float32 data (unit mean squared norm), the same tensors for both; batch {s['batch']:,},
k {s['k']}, Adam lr {s['lr']:g} betas (0.9, 0.999), no lr warm-up or decay, grad clip 1.0 where the
trainer has one. Interleaved step by step: each round runs one step of every case on the same
batch (order reversed every other round; dictionary_learning's `trainSAE` takes its step between
rounds, through its data generator); {s['rounds']} timed rounds at d_model {g0['d_model']} ({s['rounds_large']} for larger
settings) after {s['warmup_rounds']} warm-up rounds. tokens/s = batch / median step time; ratios are the median
over rounds of the ratio within a round, so both sides of a ratio saw the same load. Load average
{la['before'][0]:.1f} before, {la['after'][0]:.1f} after: other jobs share these cores, so absolute speeds drift; compare
within this run. The last column is the same ratio in process CPU time (peer / ours), the steadier
figure under contention.
{"" if torch.cuda.is_available() else "GPU table (d_model 2048, 16,384 latents): not measured, no GPU was available. The sizes are arguments (`--d-model 2048 --d-model-large 0 --latents 16384`); the script places everything on the CPU as written, so a GPU run also needs its device switched."}

| what | peer | ours tokens/s | peer tokens/s | ours / peer | by CPU time |
|---|---|---:|---:|---:|---:|
{chr(10).join(rows)}
{lockstep_text}{e2e_text}
**What each step does** (ours as of commit `{m['commit']}`{m['trainer_dirty']}). Both: encoder and
decoder as fused `addmm` (matmul + bias), top-k (or batch top-k) scattered in place into a fresh
zero tensor, MSE summed over d and averaged over the batch, backward, Adam. TopK/BatchTopK, both:
decoder rows held at unit norm (gradient component parallel to each row removed before the step,
rows renormalised after), grad-norm clip 1.0, a tokens-since-fired counter, AuxK over dead latents
(skipped while none is dead, as in the plain rows: both count a latent dead after 10M tokens).
Differences: theirs applies ReLU to all [batch, latents] pre-activations before the top-k, ours
ranks the pre-activations and applies ReLU to the k chosen only; theirs tracks the inference
threshold in TopK too (ours only in BatchTopK; their `if threshold < 0` is a host sync); ours
computes per-step metrics on the device (loss, MSE, FVU, per-model FVU, L0) and sums them as
tensors until logging, taking L0, the per-latent firing counts and BatchTopK's threshold minimum
from the batch x k selected values (no pass over the [batch, latents] codes), while theirs computes
no metrics in `update` and marks fired latents by indexing with the top-k indices. AuxK: ours works
on the dead latents' columns only (all of them here), theirs masks the full [batch, latents]. ReLU: theirs (StandardTrainer) has no grad clip and keeps the decoder at unit norm
through ConstrainedAdam with a plain L1; ours has no norm constraint and weights the L1 by decoder
norms (the crosscoder penalty: one more [batch, latents] multiply forward and backward, and the
codes' gradient arrives from two uses, so autograd adds one more [batch, latents] tensor), plus grad
clip and the same metrics. SAELens (`SAETrainer.step`): plain matmuls (`x @ W_enc + b_enc`), TopK
over the pre-activations scaled by the decoder norms and, in decoding, the codes divided by them
again (`rescale_acts_by_decoder_norm`, its training default: two more [batch, latents] multiplies
instead of a norm constraint), the same top-k-then-ReLU and scatter, grad clip 1.0, Adam, an lr
scheduler step; per step it turns the codes into a float [batch, latents] firing mask for its
feature-frequency and dead-latent counters. Its AuxK uses k_aux = d_model / 2 (64 here, as ours
2k) and `int(dead.sum())` (a host sync). Its standard SAE weights the L1 by decoder norms as ours.

{slow_text} Candidates to go further (code as of the commit above): ReLU: fold the decoder-norm
weighting of the L1 into fewer [batch, latents] ops; TopK: a sparse decode and backward
(`embedding_bag` over the k chosen decoder rows and `index_add_` for the gradients, as sparsify
does), which leaves only the
encoder's forward matmul dense. The matmuls
themselves (six per step, ~{6 * 2 * s['batch'] * g0['d_model'] * g0['latents'] / 1e9:.1f} GFLOP at d_model {g0['d_model']}) are the same on both sides{large_note}.
The rest goes to [batch, latents]-sized element-wise passes and their temporaries
({s['batch']:,} x {g0['latents']:,} float32 = {s['batch'] * g0['latents'] * 4 / 2**20:.0f} MiB each): per TopK step ours takes ~{faults_ours:,.0f} minor page faults
(fresh memory touched, {faults_ours * 4096 / 2**20:,.0f} MiB), dictionary_learning ~{faults_peer:,.0f} ({faults_peer * 4096 / 2**20:,.0f} MiB). Fewer such temporaries per
step is the lever on a CPU.
Raw figures: `benchmarks/train.json`. Reproduce: `bash benchmarks/peer_env.sh && .venv-peers/bin/python benchmarks/bench_train.py`.
"""


if __name__ == "__main__":
    main()
