"""Stage-one benchmark: is storage hidden behind compute?

Caching throughput on the same batches, at a mid-depth hook, divided by
  (a) the same model's plain forward with output_hidden_states=True (what notebooks do), and
  (b) a forward that stops at the same layer and writes nothing (the floor for any cache job);
plus stored bytes per token versus raw bfloat16. Targets: (a) >= 1.5, (b) >= 0.9.

The model has SmolLM2-135M's shape (30 layers, d_model 576) with random weights, so it runs
offline; throughput does not depend on the weights' values. Ratios are measured in one run,
interleaved, because absolute speeds on shared machines drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common.fixtures import build_model_dir
from benchmarks.common.helpers import write_section


def write_experiment(d: Path, model_dir: Path, corpus: Path, n_tokens: int, ctx: int, layer: int,
                     batch: int, device: str, dtype: str, compression: str) -> Path:
    from pipeline.config_files import write_config

    return write_config(d / "bench.toml", {
        "name": "bench",
        "store": str(d / "store"),
        "models": [{"name": "bench", "path": str(model_dir), "device": device, "dtype": dtype}],
        "hooks": [{"layer": layer, "site": "resid_post"}],
        "tokens": {"context_length": ctx, "n_tokens": n_tokens, "validation_fraction": 0.0,
                   "sources": [{"kind": "text", "paths": [str(corpus)]}]},
        "cache": {"chunk_tokens": max(ctx, 4096 // ctx * ctx), "shard_tokens": max(ctx, 16384 // ctx * ctx),
                  "batch_size": batch, "scale_sample_tokens": ctx * batch, "compression": compression},
    }, header="Written by benchmarks.bench_cache.")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_forwards(lm, ts, layer: int, batch: int, device, mode: str) -> float:
    """Seconds for forward passes over every sequence of the token set, in the job's batches."""
    from pipeline import models as M
    from pipeline.config import HookSpec

    hook = [HookSpec(layer, "resid_post")]
    sync(device)
    t0 = time.perf_counter()
    for lo in range(0, ts.n_sequences, batch):
        ids = torch.from_numpy(ts.tokens[lo:lo + batch]).long().to(device)
        if mode == "hidden_states":
            out = lm.model(ids, output_hidden_states=True, use_cache=False)
            out.hidden_states[layer + 1].float().cpu()
        else:
            M.capture(lm.model, ids, hook)[hook[0]].float().cpu()
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=["smollm2-135m", "llama-1b"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=None, help="default: middle layer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compression", default="none")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/cache.json")
    args = ap.parse_args()

    from mdiff.config import load_config
    from mdiff.tiny import make_corpus, make_tokenizer
    from pipeline import cache as C
    from pipeline import models as M
    from pipeline import store as S

    work = Path(tempfile.mkdtemp(prefix="mdiff-bench-"))
    corpus = make_corpus(work / "corpus", n_docs=max(200, args.tokens // 20))["text"]
    tok = make_tokenizer(corpus.read_text().split("\n\n"))
    model_dir = build_model_dir(work, tok, args.shape)
    n_layers = {"smollm2-135m": 30, "llama-1b": 16}[args.shape]
    layer = args.layer if args.layer is not None else n_layers // 2
    cfg_path = write_experiment(work, model_dir, corpus, args.tokens, args.ctx, layer, args.batch,
                                args.device, args.dtype, args.compression)
    cfg = load_config(cfg_path)

    rows = {"cache": [], "hidden_states": [], "stop_at_layer": []}
    for rep in range(args.repeats):
        S.StoreRoot(cfg.store).delete("activations")
        report = C.run_cache(cfg, log=lambda *_: None, progress=False)
        rows["cache"].append(report.models[0].compute_seconds)
        if rep == 0:
            root = S.StoreRoot(cfg.store)
            ts = S.open_token_set(root, report.tokenset_id)
            device = M.resolve_device(cfg.models[0].device)
            lm = M.load_model(cfg.models[0], device=device)
            arr = S.open_activation_array(root, report.models[0].hooks[f"layer{layer}.resid_post"].path)
        for mode in ("hidden_states", "stop_at_layer"):
            rows[mode].append(time_forwards(lm, ts, layer, args.batch, device, mode))

    n_tok = ts.n_sequences * ts.context_length
    med = {k: statistics.median(v) for k, v in rows.items()}
    tps = {k: n_tok / v for k, v in med.items()}
    stored = sum(f.stat().st_size for f in Path(cfg.store, arr.path, "c").rglob("*") if f.is_file())
    raw_bf16 = n_tok * lm.d_model * 2
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "setup": {"shape": args.shape, "layer": layer, "n_layers": n_layers, "tokens": n_tok,
                  "context_length": args.ctx, "batch": args.batch, "compute_dtype": str(M.resolve_dtype(cfg.models[0].dtype, device)),
                  "storage_dtype": cfg.cache.storage_dtype, "compression": args.compression,
                  "repeats": args.repeats},
        "seconds": rows,
        "tokens_per_s": tps,
        "ratio_vs_hidden_states": tps["cache"] / tps["hidden_states"],
        "ratio_vs_stop_at_layer": tps["cache"] / tps["stop_at_layer"],
        "stored_bytes_per_token": stored / n_tok,
        "raw_bf16_bytes_per_token": raw_bf16 / n_tok,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    write_section(Path(args.out), "cache", render(result))
    print(render(result))


def render(r: dict) -> str:
    m, s, t = r["machine"], r["setup"], r["tokens_per_s"]
    where = m["gpu"] or f"CPU, {m['cpu_count']} cores, {m['threads']} torch threads"
    return f"""## Stage one: caching vs plain forwards

Machine: {where}; {m['platform']}; torch {m['torch']}.
Model: {s['shape']} shape, random weights, hook layer {s['layer']} of {s['n_layers']} (resid_post);
{s['tokens']:,} tokens in sequences of {s['context_length']}, batch {s['batch']}, compute {s['compute_dtype']},
stored as {s['storage_dtype']} ({s['compression']} compression). Median of {s['repeats']} interleaved runs.

| what | tokens/s | ratio of caching to it | target |
|---|---:|---:|---|
| caching job (forward to the layer, scale, encode, Zarr write, records) | {t['cache']:,.0f} | 1.00 | |
| (a) full forward with `output_hidden_states=True` | {t['hidden_states']:,.0f} | {r['ratio_vs_hidden_states']:.2f} | >= 1.5 |
| (b) forward stopped at the layer, nothing written | {t['stop_at_layer']:,.0f} | {r['ratio_vs_stop_at_layer']:.2f} | >= 0.9 |

Stored bytes per token: {r['stored_bytes_per_token']:,.1f} (raw bfloat16: {r['raw_bf16_bytes_per_token']:,.0f}; the
difference is the shard index). Raw figures: `benchmarks/results/cache.json`. Reproduce: `make bench`.
"""


if __name__ == "__main__":
    main()
