"""Reading cached activations for training: our shuffled loader vs SAELens' cached-activation
loading vs a memmap shard cache read item by item (dictionary_learning's cache).

Run it in the peers' environment:

    bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_read

The same activations (synthetic, activation-like float32 rows) are written in each format by that
format's own writer logic:

  * ours: a Zarr store through `pipeline.store` (bfloat16, the default, and float32), read by
    `trainer.loader.ActivationLoader` (shuffle window `--window` tokens, batches of 4,096,
    converted to float32 as the trainer does);
  * SAELens: a Hugging Face Arrow dataset with one [context, d] activation column and the int32
    token ids (the layout CacheActivationsRunner writes), read by its `ActivationsStore` (reads of
    32 sequences into its mixing buffer of the same number of tokens, batches of 4,096);
  * dictionary_learning style: float32 `shard_<i>.memmap` files with a JSON shape file, read by
    indexing one token at a time through a torch `DataLoader(shuffle=True)`, as its
    `ActivationCache` is used.

Each reader is built fresh and reads one pass of `--tokens` tokens; the files' pages are evicted
before each pass (as for a cache larger than RAM) and, separately, a warm pass reads them from
the page cache. Passes alternate between readers; ratios are medians of per-repeat ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from benchmarks.common.helpers import (
    alternating,
    dir_bytes,
    drop_page_cache,
    files_under,
    gpu_note,
    load_line,
    machine_info,
    machine_line,
    paired_ratio,
    peers_missing,
    stamped_log,
    write_section,
)
from benchmarks.common.peer_fixture import add_common_args
from pipeline import store as S
from trainer.loader import ActivationLoader

try:
    from sae_lens.training.activations_store import ActivationsStore
except ImportError as e:  # pragma: no cover - the peers' environment is a separate venv
    sys.exit(peers_missing(e, "bench_peers_read"))

HOOK = "blocks.0.hook_resid_post"


def activation_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Activation-like float32 rows: a mean offset and a few strong directions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[:, None]
    base = torch.randn(8192, d, generator=g) @ mix + 0.5 * torch.randn(d, generator=g)
    return base[torch.randint(0, len(base), (n,), generator=g)]


# -- writers --------------------------------------------------------------------------------------
def write_ours(path: Path, x: torch.Tensor, *, ctx: int, dtype: str, shard: int) -> tuple:
    shutil.rmtree(path, ignore_errors=True)
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = len(x) // ctx
    tsid = "ts-bench-read"
    S.write_token_set(root, tsid, n_seq, ctx, [(np.zeros((n_seq, ctx), np.int32), np.zeros(n_seq, np.uint8))],
                      {"n_train_sequences": n_seq, "context_length": ctx})
    arr = S.create_activation_array(
        root, S.activation_path(tsid, "bench-model", "layer0.resid_post"), n_rows=n_seq * ctx,
        d_model=x.shape[1], chunk_rows=4096, shard_rows=shard, storage_dtype=dtype, compression="none",
        attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx,
               "hook": {"layer": 0, "site": "resid_post", "label": "layer0.resid_post"}})
    for s in range(arr.n_shards):
        lo, hi = arr.shard_rows_range(s)
        arr.write_shard(s, S.encode(x[lo:hi], dtype))
    assert arr.finalize()
    return S.open_token_set(root, tsid), [S.open_activation_array(root, arr.path)]


def write_saelens(path: Path, x: torch.Tensor, *, ctx: int, shard: int) -> None:
    """The dataset CacheActivationsRunner writes: Array2D activations + int32 token ids, in shards."""
    from datasets import Array2D, Dataset, Features, Sequence, Value

    shutil.rmtree(path, ignore_errors=True)
    d = x.shape[1]
    feats = Features({HOOK: Array2D(shape=(ctx, d), dtype="float32"),
                      "token_ids": Sequence(Value(dtype="int32"), length=ctx)})
    n_seq = len(x) // ctx
    ds = Dataset.from_dict({HOOK: x[: n_seq * ctx].view(n_seq, ctx, d).numpy(),
                            "token_ids": np.zeros((n_seq, ctx), np.int32)}, features=feats)
    ds.save_to_disk(str(path), num_shards=max(1, len(x) // shard))


def write_memmap(path: Path, x: torch.Tensor, *, shard: int) -> None:
    """float32 shard_<i>.memmap + shard_<i>.meta ({"shape"}) + config.json, dictionary_learning's layout."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    n = 0
    for i, lo in enumerate(range(0, len(x), shard)):
        part = x[lo:lo + shard].numpy()
        mm = np.memmap(path / f"shard_{i}.memmap", dtype=np.float32, mode="w+", shape=part.shape)
        mm[:] = part
        mm.flush()
        del mm
        (path / f"shard_{i}.meta").write_text(json.dumps({"shape": list(part.shape)}))
        n = i + 1
    (path / "config.json").write_text(json.dumps({"shard_count": n, "total_size": len(x)}))


# -- readers: each returns the seconds to read `batches` batches from a fresh reader ---------------
def read_ours(ts, arrays, *, batches: int, batch: int, window: int, threads: int) -> float:
    t0 = time.perf_counter()
    loader = ActivationLoader(arrays, ts, split="train", batch_size=batch, seed=0, buffer_tokens=window,
                              read_threads=threads, include_first_position=True, device="cpu")
    it = iter(loader)
    for _ in range(batches):
        next(it).float()
    seconds = time.perf_counter() - t0
    loader.close()
    return seconds


def read_saelens(path: Path, *, batches: int, batch: int, window: int, ctx: int, d: int) -> float:
    t0 = time.perf_counter()
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
        context_size=ctx, d_in=d, n_batches_in_buffer=window // ctx, total_training_tokens=10**12,
        store_batch_size_prompts=32, train_batch_size_tokens=batch, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32",
        cached_activations_path=str(path))
    for _ in range(batches):
        store.next_batch()
    return time.perf_counter() - t0


class MemmapCache(torch.utils.data.Dataset):
    """Indexed one token at a time across float32 memmap shards (dictionary_learning's access)."""

    def __init__(self, path: Path):
        cfg = json.loads((path / "config.json").read_text())
        self.shards = []
        for i in range(cfg["shard_count"]):
            shape = tuple(json.loads((path / f"shard_{i}.meta").read_text())["shape"])
            self.shards.append(np.memmap(path / f"shard_{i}.memmap", dtype=np.float32, mode="r", shape=shape))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return torch.tensor(self.shards[s][i - self.starts[s]], dtype=torch.float32)


def read_memmap(path: Path, *, batches: int, batch: int) -> float:
    t0 = time.perf_counter()
    dl = torch.utils.data.DataLoader(MemmapCache(path), batch_size=batch, shuffle=True, num_workers=0,
                                     generator=torch.Generator().manual_seed(0))
    it = iter(dl)
    for _ in range(batches):
        next(it)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=128, help="the tiny model's width; 2048 for the GPU table")
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--window", type=int, default=65536, help="shuffle window (tokens), both buffered readers")
    ap.add_argument("--shard-tokens", type=int, default=65536)
    ap.add_argument("--read-threads", type=int, default=4)
    add_common_args(ap, "peers_read.json", repeats=3, model=False)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = stamped_log()

    ctx, d = 128, args.d_model
    work = args.work / f"read-d{d}"
    x = activation_rows(args.tokens, d)
    log(f"writing {args.tokens:,} tokens x d_model {d} in each format")
    stores = {dt: write_ours(work / f"ours-{dt}", x, ctx=ctx, dtype=dt, shard=args.shard_tokens)
              for dt in ("bfloat16", "float32")}
    write_saelens(work / "saelens", x, ctx=ctx, shard=args.shard_tokens)
    write_memmap(work / "memmap", x, shard=args.shard_tokens)
    del x
    batches = args.tokens // args.batch
    readers = {
        f"ours/{dt}": (lambda dt=dt: read_ours(*stores[dt], batches=batches, batch=args.batch,
                                               window=args.window, threads=args.read_threads))
        for dt in ("bfloat16", "float32")}
    readers["saelens"] = lambda: read_saelens(work / "saelens", batches=batches, batch=args.batch,
                                              window=args.window, ctx=ctx, d=d)
    readers["memmap_items"] = lambda: read_memmap(work / "memmap", batches=batches, batch=args.batch)
    dirs = {"ours/bfloat16": work / "ours-bfloat16", "ours/float32": work / "ours-float32",
            "saelens": work / "saelens", "memmap_items": work / "memmap"}
    for name, fn in readers.items():  # untimed: imports, first allocations
        fn()
        log(f"  warm-up {name} done")
    load_before = os.getloadavg()
    cold, warm = {n: [] for n in readers}, {n: [] for n in readers}
    cold_cpu, warm_cpu = {n: [] for n in readers}, {n: [] for n in readers}
    for rep, order in alternating(list(readers), args.repeats):
        for name in order:
            drop_page_cache(files_under(dirs[name]))
            for wall, cpu_s in (cold, cold_cpu), (warm, warm_cpu):
                c0 = time.process_time()
                wall[name].append(readers[name]())
                cpu_s[name].append(time.process_time() - c0)
            log(f"  [{rep + 1}/{args.repeats}] {name}: cold {cold[name][-1]:.2f} s, warm {warm[name][-1]:.2f} s")
    load_after = os.getloadavg()
    n_read = batches * args.batch
    result = {
        "machine": machine_info(),
        "setup": {"tokens": args.tokens, "tokens_read": n_read, "d_model": d, "batch": args.batch,
                  "window": args.window, "shard_tokens": args.shard_tokens, "read_threads": args.read_threads,
                  "repeats": args.repeats, "context_length": ctx},
        "seconds": {"cold": cold, "warm": warm}, "cpu_seconds": {"cold": cold_cpu, "warm": warm_cpu},
        "tokens_per_s": {m: {n: n_read / statistics.median(v) for n, v in t.items()}
                         for m, t in (("cold", cold), ("warm", warm))},
        "bytes_per_token": {n: dir_bytes(p) / args.tokens for n, p in dirs.items()},
        # ours (bfloat16, the default) over each other reader, tokens/s = their seconds / ours
        "ratios": {m: {n: paired_ratio(t[n], t["ours/bfloat16"]) for n in readers if n != "ours/bfloat16"}
                   for m, t in (("cold", cold), ("warm", warm), ("cold_cpu", cold_cpu),
                                ("warm_cpu", warm_cpu))},
        "load_average": {"before": load_before, "after": load_after},
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    body = render(result)
    write_section(Path(args.out), "peers-read", body)
    print(body)


def render(r: dict) -> str:
    s, t, b, q = r["setup"], r["tokens_per_s"], r["bytes_per_token"], r["ratios"]
    labels = {"ours/bfloat16": "ours: `ActivationLoader`, bfloat16 store (default)",
              "ours/float32": "ours: `ActivationLoader`, float32 store",
              "saelens": "SAELens: `ActivationsStore` on its cached Arrow dataset (float32)",
              "memmap_items": "dictionary_learning style: float32 memmap shards, one token per `__getitem__`, `DataLoader(shuffle=True)`"}
    rows = []
    for n, label in labels.items():
        rc = "1.00" if n == "ours/bfloat16" else f"{q['cold'][n]:.2f}** ({q['cold_cpu'][n]:.2f}"
        rw = "1.00" if n == "ours/bfloat16" else f"{q['warm'][n]:.2f} ({q['warm_cpu'][n]:.2f})"
        rc = f"**{rc}**" if n == "ours/bfloat16" else f"**{rc})"
        rows.append(f"| {label} | {t['cold'][n]:,.0f} | {rc} | {t['warm'][n]:,.0f} | {rw} | {b[n]:,.0f} |")
    return f"""## Peers: reading cached activations for training

{machine_line(r['machine'])}
{load_line(r['load_average']['before'], r['load_average']['after'])}
{gpu_note(r['machine'], '--d-model 2048')}The same {s['tokens']:,} activation rows (d_model {s['d_model']}, synthetic), written in each format by that format's
writer logic; each reader is built fresh and reads {s['tokens_read']:,} tokens in batches of {s['batch']:,} (float32 out:
ours converts its bfloat16 batches as the trainer does). Shuffle window {s['window']:,} tokens for ours and for SAELens'
mixing buffer ({s['window'] // s['context_length']} batches of {s['context_length']}; reads of 32 sequences); the item-by-item reader shuffles the whole
cache. Shards of {s['shard_tokens']:,} tokens everywhere. "Cold": the files' pages evicted before the pass; "warm": the
pass right after, from the page cache. {s['repeats']} repeats in alternating order.

| reader | cold tokens/s | ours / it, cold | warm tokens/s | ours / it, warm | bytes per token on disk |
|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

"ours / it" is ours (bfloat16) tokens/s over that reader's, the median of per-repeat ratios; in brackets
the same ratio in process CPU time (read threads included), the steadier figure on a shared machine.
Where the time goes: SAELens slices 32 sequences at a time out of its Arrow dataset, converted to
torch tensors by the dataset's formatter, then its mixing buffer concatenates and permutes; the
item-by-item reader pays a Python call, a memmap row and a new tensor per token, and the `DataLoader`
stacks 4,096 of them per batch. Ours reads whole 4,096-row chunks, one `preadv` each, on background
threads into a reused window buffer, and assembles a batch with one indexing operation.
Raw figures: `benchmarks/results/peers_read.json`. Reproduce: `bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_read`
(`--d-model 2048` for the GPU-sized rows).
"""


if __name__ == "__main__":
    main()
