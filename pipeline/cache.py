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

from pipeline.config import CacheExperiment as ExperimentConfig
from pipeline.config import CacheSpec, HookSpec, ModelSpec
from pipeline.config_files import dump_config
from pipeline.typed_config import ConfigError

from . import experiment as E
from . import models as M
from . import store as S
from . import tokens as T


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
                    stored = arr.stored_scale()
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
        where = f"{lm.spec.name} {h.label}"
        scales[h] = S.normalization_scale(lm.d_model, sums[h] / count, lambda mean_norm: S.StoreError(
            f"{where}: mean activation norm is {mean_norm}; "
            "the model produces non-finite or zero activations there"))
    return scales


@torch.inference_mode()
def compute_shard(lm, ts: S.TokenSet, arrays: dict[HookSpec, S.ActivationArray], shard: int,
                  cache: CacheSpec, device: torch.device, bar=None) -> dict[HookSpec, np.ndarray]:
    """The stored bytes of one shard of each array: one forward pass per batch feeds every hook.

    Whoever calls it (the job, a rerun, a repair) gets the same batches, hence the same bytes.
    """
    ctx = ts.context_length
    hooks = list(arrays)
    start, stop = arrays[hooks[0]].shard_rows_range(shard)
    bufs = {h: [] for h in hooks}
    for _, _, ids in _batches(ts, start // ctx, stop // ctx, cache.batch_size):
        acts = M.capture(lm.model, ids.to(device), hooks)
        for h in hooks:
            x = acts[h].reshape(-1, lm.d_model).float() * arrays[h].scale
            bufs[h].append(S.encode(x, cache.storage_dtype))
        if bar is not None:
            bar.update(ids.numel())
    return {h: np.concatenate(bufs[h]) for h in hooks}


def array_attrs(cfg: ExperimentConfig, lm, hook: HookSpec, ts_id: str, scale: float) -> dict:
    """A cached array's attributes (storage_layout.md), for every writer of cached arrays."""
    return {
        "scale": scale,
        "normalization": S.NORMALIZATION,
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
    pending = [h for h in cfg.hooks if not S.array_complete(root, paths[h])]
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
        new = [h for h in pending if not S.array_exists(root, paths[h])]
        scales = estimate_scales(lm, ts, new, cfg.cache, device) if new else {}
        for h in new:
            S.create_activation_array(root, paths[h], **structure,
                                      attrs=array_attrs(cfg, lm, h, ts.id, scales[h]))
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
    t0 = time.perf_counter()
    try:
        try:
            for shard in mine:
                needed = {h: arrays[h] for h in pending if shard not in done[h]}
                for h, data in compute_shard(lm, ts, needed, shard, cfg.cache, device, bar).items():
                    writer.submit(arrays[h], shard, data)
        finally:
            bar.close()
            writer.close()
    except S.StoreFullError as e:
        raise S.StoreFullError(f"{e} {_space_still_needed(cfg, spec, arrays, mine)}") from e
    result.compute_seconds = time.perf_counter() - t0
    dist.barrier()
    for h in pending:
        arr = arrays[h]
        complete = arr.finalize() if dist.is_main else arr.is_complete()
        written = sum(1 for s in mine if s not in done[h])
        result.hooks[h.label] = HookResult(arr.path, "computed" if complete else "partial",
                                           written, arr.scale)
    return result, todo_tokens


def _space_still_needed(cfg: ExperimentConfig, spec: ModelSpec, arrays: dict, mine: list[int]) -> str:
    """How much space a full store still needs: recorded shards are kept, so only the rest counts."""
    itemsize = 2 if cfg.cache.storage_dtype == "bfloat16" else 4
    need, n = 0, 0
    for arr in arrays.values():
        for s in set(mine) - arr.done_shards():
            lo, hi = arr.shard_rows_range(s)
            need += (hi - lo) * arr.d_model * itemsize
            n += 1
    later = len(cfg.models) - 1 - [m.name for m in cfg.models].index(spec.name)
    more = f", plus about as much for each of the {later} model(s) after it" if later else ""
    return f"{spec.name} still needs about {S.human_bytes(need)} for its {n} unrecorded shard(s){more}."


def _preflight(cfg: ExperimentConfig) -> None:
    """Refuse hooks past a model's depth, and a crosscoder over models of different widths, from
    the models' configs alone: before a token set is built or a byte is written."""
    where = cfg.source_file or "<config>"
    widths = {}
    for m in cfg.models:
        if not m.has_weights:  # an imported cache: nothing to run
            continue
        try:
            widths[m.name] = int(M.preflight(m, cfg.hooks).hidden_size)
        except ValueError as e:
            if type(e) is not ValueError:  # unsupported architecture etc.: already clear
                raise
            raise ConfigError(where, [f"hooks: {e} (fix [[hooks]] or the model)"]) from None
    train = cfg.train
    names = (train.models or [m.name for m in cfg.models]) if train is not None else []
    names = [n for n in names if n in widths]
    if len(names) > 1 and len({widths[n] for n in names}) > 1:
        sizes = ", ".join(f"{n}: {widths[n]}" for n in names)
        raise ConfigError(where, [
            f"train.models: a crosscoder needs the same d_model in every model, but these differ "
            f"({sizes}) (train one SAE per model with train.models = [one name], or choose "
            f"checkpoints of one width)"])


def token_set_attrs(cfg: ExperimentConfig, ref: E.TokenSetRef) -> dict:
    """The token set's group attributes (storage_layout.md), for every writer of token sets."""
    plan, tokenizer = ref.plan, ref.tokenizer
    return {
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


def run_cache(cfg: ExperimentConfig, log=print, progress: bool = True) -> CacheReport:
    """Cache every (model, hook) of the experiment; reuse whatever the store already holds."""
    rerun = f"Rerun: mdiff cache {cfg.source_file or '<config>'}"
    try:
        return _run_cache(cfg, log, progress)
    except S.StoreWriteError as e:
        raise type(e)(f"{e} {rerun}") from e
    except S.StoreError:
        raise
    except Exception as e:
        if not S.is_connection_error(e):
            raise
        cause = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        raise S.StoreWriteError(
            f"lost the connection to the store {cfg.store} ({cause}). Nothing unrecorded is "
            f"counted as written; once the store is reachable again, r{rerun[1:]}") from e


def _run_cache(cfg: ExperimentConfig, log, progress: bool) -> CacheReport:
    dist = _Dist()
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=False)  # refuse a newer store format before any work
    ref = E.resolve_token_set(cfg, log if dist.is_main else None)  # tokenizers must share a vocabulary
    _preflight(cfg)
    root.ensure_format(create=dist.is_main)  # nothing is written before the checks above pass
    ts_id, plan, tokenizer = ref.id, ref.plan, ref.tokenizer
    reused = S.token_set_complete(root, ts_id)
    if not reused and dist.is_main:
        log(f"token set {ts_id}: tokenizing {plan.n_tokens:,} tokens "
            f"({plan.n_sequences:,} sequences of {plan.context_length})")
        S.write_token_set(root, ts_id, plan.n_sequences, plan.context_length,
                          T.iter_token_set(cfg.tokens, tokenizer), token_set_attrs(cfg, ref))
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
