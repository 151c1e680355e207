"""The caching job: token set -> batched forward passes -> normalized activations in the store.

Resumable at shard granularity: a shard is recomputed unless its completion record exists, and
every shard is computed from the same sequences in the same batches whoever computes it, so a
killed-and-resumed job, a second concurrent job, or N processes all produce the same bytes.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import experiment as E
from . import models as M
from . import store as S
from . import tokens as T
from .config import CacheSpec, ExperimentConfig, HookSpec, ModelSpec, dump_config


@dataclass
class HookResult:
    path: str
    status: str  # "reused" | "computed" | "partial"
    shards_written: int = 0
    scale: float = 0.0


@dataclass
class ModelResult:
    name: str
    key: str
    hooks: dict[str, HookResult] = field(default_factory=dict)
    compute_seconds: float = 0.0  # forward passes + writes of this process, load and scale excluded


@dataclass
class CacheReport:
    tokenset_id: str
    tokenset_reused: bool
    models: list[ModelResult]
    tokens_computed: int = 0


class _Dist:
    """The few collective operations the job needs, via accelerate when launched with it."""

    def __init__(self):
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.is_main = self.state.is_main_process

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()


class _ShardWriter:
    """Writes shards on a background thread so Zarr I/O overlaps the next forward passes.

    The queue is bounded, so memory is a few shards, and the first write error stops the job.
    """

    def __init__(self, writer_id: str, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.writer_id = writer_id
        self.thread = threading.Thread(target=self._run, daemon=True, name="mdiff-shard-writer")
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            arr, shard, data = item
            if self.error is None:
                try:
                    stored = arr.root.read_json(f"{arr.path}/zarr.json")["attributes"]["scale"]
                    if stored != arr.scale:
                        raise S.StoreError(
                            f"{arr.path}: the array was re-created by another job with scale "
                            f"{stored} (this job used {arr.scale}); rerun `mdiff cache` to resume"
                        )
                    arr.write_shard(shard, data, writer=self.writer_id)
                except BaseException as e:  # surfaced on the main thread
                    self.error = e

    def submit(self, arr: S.ActivationArray, shard: int, data) -> None:
        self._raise()
        self.q.put((arr, shard, data))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error


def _batches(ts: S.TokenSet, seq_lo: int, seq_hi: int, batch_size: int):
    for lo in range(seq_lo, seq_hi, batch_size):
        hi = min(lo + batch_size, seq_hi)
        yield lo, hi, torch.from_numpy(ts.tokens[lo:hi]).long()


@torch.inference_mode()
def estimate_scales(lm, ts: S.TokenSet, hooks: list[HookSpec], cache: CacheSpec,
                    device: torch.device) -> dict[HookSpec, float]:
    """s with mean ||s x|| = sqrt(d_model), over the first training sequences (already a random
    sample: the token set's order is shuffled), position 0 excluded: its norm is often an outlier
    many times larger than the rest (attention sinks, massive activations)."""
    n_seq = min(ts.n_train_sequences or ts.n_sequences,
                max(1, math.ceil(cache.scale_sample_tokens / ts.context_length)))
    sums = {h: 0.0 for h in hooks}
    count = 0
    for _, _, ids in _batches(ts, 0, n_seq, cache.batch_size):
        acts = M.capture(lm.model, ids.to(device), hooks)
        for h in hooks:
            sums[h] += acts[h][:, 1:].float().norm(dim=-1).double().sum().item()
        count += ids.shape[0] * (ids.shape[1] - 1)
    scales = {}
    for h in hooks:
        mean_norm = sums[h] / count
        if not math.isfinite(mean_norm) or mean_norm <= 0:
            raise S.StoreError(f"{lm.spec.name} {h.label}: mean activation norm is {mean_norm}; "
                               "the model produces non-finite or zero activations there")
        # rounded to float32 so that x * s means the same thing on every device
        scales[h] = float(torch.tensor(math.sqrt(lm.d_model) / mean_norm, dtype=torch.float32))
    return scales


def _array_attrs(cfg: ExperimentConfig, lm, hook: HookSpec, ts_id: str, scale: float) -> dict:
    return {
        "scale": scale,
        "normalization": "stored = raw * scale; mean L2 norm of stored rows ~= sqrt(d_model), "
                         "position 0 of each sequence excluded from the estimate",
        "model": lm.identity,
        "model_key": lm.key,
        "model_name": lm.spec.name,
        "architecture": lm.architecture,
        "hook": {"layer": hook.layer, "site": hook.site, "label": hook.label},
        "tokenset_id": ts_id,
        "context_length": cfg.tokens.context_length,
        "produced_by": {"config": cfg.source_file, "experiment": cfg.name},
    }


def cache_model(cfg: ExperimentConfig, spec: ModelSpec, root: S.StoreRoot, ts: S.TokenSet,
                dist: _Dist, log=print, progress: bool = True) -> tuple[ModelResult, int]:
    device = M.resolve_device(spec.device)
    dtype = M.resolve_dtype(spec.dtype, device)
    identity = M.model_identity(spec, dtype)
    key = M.model_key(identity)
    result = ModelResult(spec.name, key)
    paths = {h: S.activation_path(ts.id, key, h.label) for h in cfg.hooks}
    pending = [h for h in cfg.hooks if not root.exists(f"{paths[h]}/_complete.json")]
    for h in cfg.hooks:
        if h not in pending:
            arr = S.open_activation_array(root, paths[h])
            result.hooks[h.label] = HookResult(paths[h], "reused", 0, arr.scale)
    if not pending:
        if dist.is_main:
            log(f"{spec.name}: already cached as {key} for all {len(cfg.hooks)} hook(s); "
                f"nothing to compute")
        return result, 0

    lm = M.load_model(spec, device=device)
    structure = dict(n_rows=ts.n_sequences * ts.context_length, d_model=lm.d_model,
                     chunk_rows=cfg.cache.chunk_tokens, shard_rows=cfg.cache.shard_tokens,
                     storage_dtype=cfg.cache.storage_dtype, compression=cfg.cache.compression)
    if dist.is_main:
        new = [h for h in pending if not root.exists(f"{paths[h]}/zarr.json")]
        scales = estimate_scales(lm, ts, new, cfg.cache, device) if new else {}
        for h in new:
            S.create_activation_array(root, paths[h], **structure,
                                      attrs=_array_attrs(cfg, lm, h, ts.id, scales[h]))
    dist.barrier()
    arrays = {h: S.open_activation_array(root, paths[h]) for h in pending}
    for arr in arrays.values():
        arr.check_structure(structure)
        if dist.is_main:
            arr.remove_stale_partials()

    n_shards = next(iter(arrays.values())).n_shards
    done = {h: arr.done_shards() for h, arr in arrays.items()}
    mine = [s for s in range(n_shards) if s % dist.world == dist.rank
            and any(s not in done[h] for h in pending)]
    rows_per_shard = cfg.cache.shard_tokens
    todo_tokens = sum(min(rows_per_shard, structure["n_rows"] - s * rows_per_shard) for s in mine)
    if dist.is_main:
        n_done = min(len(d) for d in done.values())
        log(f"{spec.name}: caching {len(pending)} hook(s) as {key}: {len(mine)} of {n_shards} "
            f"shards to compute on this process ({n_done} already recorded), device {device}, {dtype}")

    writer = _ShardWriter(f"{socket.gethostname()}:rank{dist.rank}")
    bar = tqdm(total=todo_tokens, unit="tok", unit_scale=True, desc=spec.name,
               disable=not progress, dynamic_ncols=True)
    ctx = ts.context_length
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            for shard in mine:
                hooks_needed = [h for h in pending if shard not in done[h]]
                start, stop = arrays[hooks_needed[0]].shard_rows_range(shard)
                bufs = {h: [] for h in hooks_needed}
                for _, _, ids in _batches(ts, start // ctx, stop // ctx, cfg.cache.batch_size):
                    acts = M.capture(lm.model, ids.to(device), hooks_needed)
                    for h in hooks_needed:
                        x = acts[h].reshape(-1, lm.d_model).float() * arrays[h].scale
                        bufs[h].append(S.encode(x, cfg.cache.storage_dtype))
                    bar.update(ids.numel())
                for h in hooks_needed:
                    writer.submit(arrays[h], shard, np.concatenate(bufs[h]))
    finally:
        bar.close()
        writer.close()
    result.compute_seconds = time.perf_counter() - t0
    dist.barrier()
    for h in pending:
        arr = arrays[h]
        complete = arr.finalize() if dist.is_main else arr.is_complete()
        written = sum(1 for s in mine if s not in done[h])
        result.hooks[h.label] = HookResult(arr.path, "computed" if complete else "partial",
                                           written, arr.scale)
    return result, todo_tokens


def run_cache(cfg: ExperimentConfig, log=print, progress: bool = True) -> CacheReport:
    """Cache every (model, hook) of the experiment; reuse whatever the store already holds."""
    dist = _Dist()
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=dist.is_main)
    ref = E.resolve_token_set(cfg)
    for m in cfg.models:  # refuse bad hooks before any work
        M.preflight(m, cfg.hooks)
    ts_id, plan, tokenizer = ref.id, ref.plan, ref.tokenizer
    reused = S.token_set_complete(root, ts_id)
    if not reused and dist.is_main:
        log(f"token set {ts_id}: tokenizing {plan.n_tokens:,} tokens "
            f"({plan.n_sequences:,} sequences of {plan.context_length})")
        attrs = {
            "spec": dump_config(cfg)["tokens"],
            "sources": plan.source_descriptions,
            "source_counts": list(plan.counts),
            "tokenizer_fingerprint": ref.fingerprint,
            "tokenizer_from": ref.tokenizer_from,
            "context_length": plan.context_length,
            "n_sequences": plan.n_sequences,
            "n_train_sequences": plan.n_train_sequences,
            "n_validation_sequences": plan.n_validation,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        S.write_token_set(root, ts_id, plan.n_sequences, plan.context_length,
                          T.iter_token_set(cfg.tokens, tokenizer), attrs)
    elif dist.is_main:
        log(f"token set {ts_id}: already in the store; reusing it")
    dist.barrier()
    ts = S.open_token_set(root, ts_id)

    report = CacheReport(ts_id, reused, [])
    for m in cfg.models:
        res, n = cache_model(cfg, m, root, ts, dist, log=log, progress=progress)
        report.models.append(res)
        report.tokens_computed += n
    return report
