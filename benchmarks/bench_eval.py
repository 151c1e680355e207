"""Stage-three benchmark: what does splice evaluation cost over the forwards it must do?

`evaluate_dictionary` runs, per model and batch of b validation sequences, four variants (clean,
spliced, zero- and mean-ablated). Any implementation needs at least four plain forwards of b
sequences for that, so the baseline is exactly those: `model(input_ids).logits` four times per
batch, per model, over the same tokens. Overhead = eval time / baseline time - 1; target <= 25%.
Eval time is the whole call (config and store checks, the mean pass over the store, store reads,
the dictionary, the stacked forwards, float32 log-softmax, KL, metrics, the JSON), with the
models already loaded (as `models_cache` makes them when a sweep is evaluated).

Two checkpoints of SmolLM2-135M's shape (30 layers, d_model 576, vocab 49,152) with random
weights, the second a perturbed copy of the first (as a fine-tune is); a 2-model batchtopk
crosscoder with 2,048 latents briefly trained on the cache. Runs offline on a CPU. Timings are
interleaved repeats and medians, because speeds on shared machines drift.
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

SHAPE_LAYERS = 30


def perturbed_copy(src: Path, dst: Path, tokenizer, seed: int = 1, rel: float = 0.05) -> Path:
    """A second checkpoint: every weight plus 5% Gaussian noise (different identity, same shape)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * rel)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def write_experiment(d: Path, models: dict[str, Path], corpus: Path, n_tokens: int, ctx: int,
                     layer: int, val_fraction: float, latents: int, k: int) -> Path:
    from pipeline.config_files import write_config

    return write_config(d / "bench-eval.toml", {
        "name": "bench-eval",
        "store": str(d / "store"),
        "models": [{"name": n, "path": str(p), "device": "cpu"} for n, p in models.items()],
        "hooks": [{"layer": layer, "site": "resid_post"}],
        "tokens": {"context_length": ctx, "n_tokens": n_tokens, "validation_fraction": val_fraction,
                   "sources": [{"kind": "text", "paths": [str(corpus)]}]},
        "cache": {"chunk_tokens": max(ctx, 4096 // ctx * ctx), "shard_tokens": max(ctx, 16384 // ctx * ctx),
                  "batch_size": 8, "scale_sample_tokens": 4 * ctx},
        "train": {"out_dir": str(d / "train"), "batch_size": 512, "steps": 100, "lr": 1e-3,
                  "lr_warmup_steps": 10, "log_every": 50, "eval_every": 100, "eval_batches": 1,
                  "checkpoint_every": 100, "buffer_tokens": 4096, "device": "cpu",
                  "dictionaries": [{"name": f"btk-{latents}", "architecture": "batchtopk",
                                    "n_latents": latents, "k": k}]},
    }, header="Written by benchmarks.bench_eval.")


@torch.inference_mode()
def time_plain_forwards(lms, ts, n_seq: int, batch: int, stacked: bool) -> float:
    """Seconds for the forwards splicing needs, done plainly: per model and batch of `batch`
    validation sequences, four forwards of the batch (or one of the batch stacked four times)."""
    t0 = time.perf_counter()
    start = ts.n_train_sequences
    for lm in lms:
        for lo in range(start, start + n_seq, batch):
            ids = torch.from_numpy(ts.tokens[lo:min(lo + batch, start + n_seq)]).long()
            for stacked_ids in ([ids.repeat(4, 1)] if stacked else [ids] * 4):
                _ = lm.model(input_ids=stacked_ids, use_cache=False).logits
    return time.perf_counter() - t0


@torch.inference_mode()
def time_parts(arrays, dictionary, ts, n_seq: int, batch: int) -> dict[str, float]:
    """The evaluation's non-forward work on its own: store reads and the dictionary."""
    from evals import splice as SP

    ctx, start = ts.context_length, ts.n_train_sequences
    t0 = time.perf_counter()
    xs = [SP._read_batch(arrays, lo * ctx, min(lo + batch, start + n_seq) * ctx)
          for lo in range(start, start + n_seq, batch)]
    t1 = time.perf_counter()
    for x in xs:
        SP._encode_decode(dictionary, x.view(-1, ctx, len(arrays), x.shape[-1])[:, 1:]
                          .reshape(-1, len(arrays), x.shape[-1]))
    t2 = time.perf_counter()
    return {"store_read": t1 - t0, "dictionary": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--n-sequences", type=int, default=8, help="validation sequences evaluated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layer", type=int, default=SHAPE_LAYERS // 2)
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--json", default="benchmarks/results/eval.json")
    args = ap.parse_args()

    from evals import splice as SP
    from mdiff.config import load_config
    from mdiff.tiny import make_corpus, make_tokenizer
    from pipeline import models as M
    from pipeline import store as S
    from pipeline.cache import run_cache
    from trainer.dictionaries import load_dictionary
    from trainer.train import run_train

    def quiet(*_):
        return None

    work = Path(tempfile.mkdtemp(prefix="mdiff-bench-eval-"))
    # half training split (>= 4,096 tokens, for the dictionary), half validation (>= what is evaluated)
    n_tokens = 2 * max(args.n_sequences, -(-4096 // args.ctx)) * args.ctx
    corpus = make_corpus(work / "corpus", n_docs=max(200, n_tokens // 20))["text"]
    tok = make_tokenizer(corpus.read_text().split("\n\n"))
    base = build_model_dir(work, tok, "smollm2-135m")
    models = {"base": base, "tuned": perturbed_copy(base, work / "tuned", tok)}
    cfg = load_config(write_experiment(work, models, corpus, n_tokens, args.ctx, args.layer, 0.5,
                                       args.latents, args.k))
    t0 = time.perf_counter()
    run_cache(cfg, log=quiet, progress=False)
    cache_s = time.perf_counter() - t0
    report = run_train(cfg, log=quiet, progress=False)
    dict_dir = report.out_dir / cfg.train.dictionaries[0].name

    cache = {m.name: M.load_model(m, device="cpu") for m in cfg.models}
    lms = [cache[m.name] for m in cfg.models]
    root = S.StoreRoot(cfg.store)
    meta = json.loads((dict_dir / "config.json").read_text())
    ts = S.open_token_set(root, meta["tokenset_id"])
    arrays = [S.open_activation_array(root, p) for p in meta["arrays"]]
    dictionary = load_dictionary(dict_dir).eval()
    n_seq = min(args.n_sequences, ts.n_sequences - ts.n_train_sequences)

    def evaluate(stack: bool = True):
        t = time.perf_counter()
        result = SP.evaluate_dictionary(dict_dir, cfg, out_dir=work / "eval", n_sequences=n_seq,
                                        batch_size=args.batch, device="cpu", progress=False,
                                        models_cache=cache, stack_variants=stack)
        return time.perf_counter() - t, result

    evaluate()  # warm-up: first-call costs (allocator, tokenizer files) are not what is measured
    rows: dict[str, list[float]] = {"eval": [], "eval_unstacked": [], "plain_4x": [],
                                    "plain_stacked": [], "store_read": [], "dictionary": []}
    for _ in range(args.repeats):
        seconds, result = evaluate()
        rows["eval"].append(seconds)
        rows["eval_unstacked"].append(evaluate(stack=False)[0])
        rows["plain_4x"].append(time_plain_forwards(lms, ts, n_seq, args.batch, stacked=False))
        rows["plain_stacked"].append(time_plain_forwards(lms, ts, n_seq, args.batch, stacked=True))
        for k, v in time_parts(arrays, dictionary, ts, n_seq, args.batch).items():
            rows[k].append(v)

    med = {k: statistics.median(v) for k, v in rows.items()}
    n_tok = n_seq * ts.context_length  # token positions evaluated per model
    out = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()},
        "setup": {"shape": "smollm2-135m", "n_layers": SHAPE_LAYERS, "layer": args.layer,
                  "site": "resid_post", "models": 2, "context_length": ts.context_length,
                  "n_sequences": n_seq, "batch": args.batch, "tokens_per_model": n_tok,
                  "n_latents": args.latents, "architecture": "batchtopk", "k": args.k,
                  "storage_dtype": cfg.cache.storage_dtype, "compute_dtype": str(lms[0].dtype),
                  "repeats": args.repeats, "cache_seconds": cache_s},
        "seconds": rows,
        "median_seconds": med,
        "tokens_per_s": {k: n_tok / med[k]
                         for k in ("eval", "eval_unstacked", "plain_4x", "plain_stacked")},
        # each repeat times the evaluation and the baselines back to back, under the same load:
        # the median of the per-repeat ratios is the figure that drift disturbs least
        "overhead_vs_plain_4x": statistics.median(
            e / p - 1 for e, p in zip(rows["eval"], rows["plain_4x"])),
        "overhead_vs_plain_stacked": statistics.median(
            e / p - 1 for e, p in zip(rows["eval"], rows["plain_stacked"])),
        "overhead_unstacked_vs_plain_4x": statistics.median(
            e / p - 1 for e, p in zip(rows["eval_unstacked"], rows["plain_4x"])),
        "overhead_vs_plain_4x_of_medians": med["eval"] / med["plain_4x"] - 1,
        "overhead_vs_plain_stacked_of_medians": med["eval"] / med["plain_stacked"] - 1,
        "metrics": result["metrics"],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    write_section(Path(args.out), "eval", render(out))
    print(render(out))


def render(r: dict) -> str:
    m, s, med, t = r["machine"], r["setup"], r["median_seconds"], r["tokens_per_s"]
    metrics = r["metrics"]
    ce = ", ".join(f"{name} {v['ce_diff']:+.4f}" for name, v in metrics["per_model"].items())
    load = ", ".join(f"{x:.1f}" for x in m["load_average"])
    return f"""## Stage three: splice evaluation vs the plain forwards it needs

Machine: CPU, {m['cpu_count']} cores, {m['threads']} torch threads; {m['platform']}; torch {m['torch']};
load average after the run {load} (other jobs shared the machine).
Models: 2 checkpoints of SmolLM2-135M's shape (random weights; the second a perturbed copy),
compute {s['compute_dtype'].removeprefix('torch.')}, hook layer {s['layer']} of {s['n_layers']} ({s['site']}). Dictionary: {s['architecture']}
crosscoder, {s['n_latents']:,} latents, k {s['k']}, 100 training steps. Evaluated: {s['n_sequences']} validation
sequences of {s['context_length']} tokens, batch {s['batch']} (4 x {s['batch']} sequences per stacked forward), stored as
{s['storage_dtype']}. Median of {s['repeats']} interleaved repeats after one warm-up; models already loaded.

| what | seconds | validation tokens/s | eval overhead over it | target |
|---|---:|---:|---:|---|
| `evaluate_dictionary` (checks, mean pass, reads, dictionary, 4 variants, CE/KL, JSON), `stack_variants=True` (the GPU default: one forward of 4b sequences) | {med['eval']:.2f} | {t['eval']:,.0f} | | |
| the same with `stack_variants=False` (the CPU default: four forwards of b) | {med['eval_unstacked']:.2f} | {t['eval_unstacked']:,.0f} | {r['overhead_unstacked_vs_plain_4x']:+.1%} over (4 plain forwards) | |
| 4 plain forwards (`model(ids).logits`) per batch and model: the forwards it must do | {med['plain_4x']:.2f} | {t['plain_4x']:,.0f} | **{r['overhead_vs_plain_4x']:+.1%}** | <= +25% |
| 1 plain forward of the batch stacked 4 times (same compute, one call) | {med['plain_stacked']:.2f} | {t['plain_stacked']:,.0f} | {r['overhead_vs_plain_stacked']:+.1%} | |
| store reads of the evaluated rows, once (the evaluation reads them twice) | {med['store_read']:.2f} | | | |
| dictionary encode + decode of the evaluated tokens | {med['dictionary']:.2f} | | | |

Validation tokens/s: evaluated sequence positions per second, both models and all four variants included.
Overheads are medians over repeats of eval / baseline - 1, each repeat timing both back to back;
from the median times instead: {r['overhead_vs_plain_4x_of_medians']:+.1%} over the 4 plain forwards,
{r['overhead_vs_plain_stacked_of_medians']:+.1%} over the stacked one.
The brief crosscoder's ce_diff: {ce}; explained variance {metrics['explained_variance']:.3f}, l0 {metrics['l0']:.1f}.
Raw figures: `benchmarks/results/eval.json`. Reproduce: `python -m benchmarks.bench_eval`.
"""


if __name__ == "__main__":
    main()
