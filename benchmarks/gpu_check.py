"""The GPU check: every stage on realistic shapes, through the project's own stage functions, as a
pass/fail table.

Offline: random-weight models of real shapes (two SmolLM2-135M-shaped Llamas for a crosscoder, a
Pythia-160M-shaped GPT-NeoX for SAEs; only their configs are real) and a generated corpus with a
small BPE tokenizer (mdiff/tiny.py); throughput does not depend on the weights' values. Two
experiment files are written to the work directory and run with `pipeline.cache.run_cache`,
`trainer.train.run_train` and `evals.run.run_eval`, as `mdiff cache/train/eval` run them.

Checks (tokens/s count a token once, whatever the number of models):
  cache    tokens/s of `mdiff cache` >= 1.5x a plain `model(ids, output_hidden_states=True)` forward
           of the same model on the same batches (the cache stops at the hooked layer and writes)
  loader   the training loader alone (as `mdiff train` builds it, onto the device) >= 2x what the
           trainer consumes: train steps of the crosscoder on one batch already on the device
  sweep    a lockstep sweep of 4 SAEs (`mdiff train`, one [train] section) <= 1.5x the time of one
and, for information, end-to-end training and evaluation tokens/s against the plain forward.

Without CUDA (or with --small) it runs small shapes on the CPU in well under a minute (the test
suite runs it so); those numbers say only that every stage ran. benchmarks/gpu_check.sh sets up a
GPU machine and runs this with --strict (exit status 1 when a check fails).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from benchmarks.common.helpers import stamped_log

SHAPES = {  # (architecture, config keys) of each model; "small" for the CPU / --small run
    "gpu": {
        "smollm2-135m": ("llama", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                       num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                       tie_word_embeddings=True, rope_theta=100000.0)),
        "pythia-160m": ("gpt_neox", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, vocab_size=50304, rotary_pct=0.25,
                                         use_parallel_residual=True, tie_word_embeddings=False)),
    },
    "small": {
        "smollm2-135m": ("llama", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                       tie_word_embeddings=True)),
        "pythia-160m": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=256, vocab_size=512, rotary_pct=0.25)),
    },
}
SIZES = {
    # 1M tokens per model at context 1024, cache batches of 32 sequences; a 16,384-latent BatchTopK
    # crosscoder and 4 SAEs of 16,384 latents, batches of 4,096 tokens
    "gpu": dict(ctx=1024, n_tokens=1 << 20, cache_batch=32, chunk=4096, shard=65536, latents=16384, k=64,
                batch=4096, train_steps=300, sweep_steps=200, consume_steps=50, loader_batches=200,
                buffer_tokens=262144, read_threads=8, eval_sequences=64, eval_batch=8, browser_rows=65536),
    "small": dict(ctx=64, n_tokens=8192, cache_batch=16, chunk=512, shard=2048, latents=256, k=8,
                  batch=256, train_steps=10, sweep_steps=10, consume_steps=5, loader_batches=20,
                  buffer_tokens=2048, read_threads=2, eval_sequences=4, eval_batch=4, browser_rows=512),
}
CACHE_TARGET, LOADER_TARGET, SWEEP_TARGET = 1.5, 2.0, 1.5


def build_models(work: Path, tokenizer, mode: str) -> dict[str, Path]:
    """Random-weight Hugging Face folders: two SmolLM2-shaped models (seeds 0, 1) and a Pythia-shaped one."""
    import transformers as T

    out = {}
    for name, shape, seed in [("smol-a", "smollm2-135m", 0), ("smol-b", "smollm2-135m", 1),
                              ("pythia", "pythia-160m", 0)]:
        arch, keys = SHAPES[mode][shape]
        cls = T.LlamaConfig if arch == "llama" else T.GPTNeoXConfig
        cfg = cls(**keys, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, pad_token_id=2)
        torch.manual_seed(seed)
        model = T.AutoModelForCausalLM.from_config(cfg)
        out[name] = work / "models" / name
        model.save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
        del model
    return out


def write_configs(work: Path, fixture: dict, s: dict, mode: str) -> dict[str, Path]:
    """The crosscoder experiment (2 SmolLM2-shaped models; train and eval) and the SAE sweep and its
    single-SAE baseline (the Pythia-shaped model), all on one store and token set."""
    from mdiff.tiny import train_section, write_config

    layers = {n: SHAPES[mode][shape][1]["num_hidden_layers"] // 2
              for n, shape in [("smol", "smollm2-135m"), ("pythia", "pythia-160m")]}
    common = dict(store=str(work / "store"), n_tokens=s["n_tokens"], context_length=s["ctx"],
                  chunk_tokens=s["chunk"], shard_tokens=s["shard"], batch_size=s["cache_batch"],
                  scale_sample_tokens=min(s["n_tokens"] // 2, 262144))

    def train(name, models, hook_layer, dictionaries, steps):
        section = train_section(models, dictionaries, steps=steps, lr=2e-4, batch_size=s["batch"],
                                checkpoint_every=steps, eval_every=steps, eval_batches=2,
                                read_threads=s["read_threads"],
                                extra={"hook": f"layer{hook_layer}.resid_post", "buffer_tokens": s["buffer_tokens"],
                                       "out_dir": str(work / "runs" / name), "lr_warmup_steps": 2})
        return section

    def batchtopk(name, k):
        return {"name": name, "architecture": "batchtopk", "n_latents": s["latents"], "k": k}

    configs = {}
    fx = {**fixture, "models": {m: fixture["models"][m] for m in ("smol-a", "smol-b")}}
    configs["crosscoder"] = write_config(
        work / "crosscoder.toml", fx, hooks=((layers["smol"], "resid_post"),), name="gpu-check-crosscoder",
        train={**train("crosscoder", ["smol-a", "smol-b"], layers["smol"], [batchtopk("batchtopk", s["k"])],
                       s["train_steps"]),
               "eval": {"n_sequences": s["eval_sequences"], "batch_size": s["eval_batch"], "top_latents": 10,
                        "contexts_per_latent": 4, "browser": {"rows": s["browser_rows"]}}},
        **common)
    fx = {**fixture, "models": {"pythia": fixture["models"]["pythia"]}}
    for name, ks in [("sweep", [s["k"] // 2, s["k"], 2 * s["k"], 4 * s["k"]]), ("single", [s["k"]])]:
        configs[name] = write_config(
            work / f"{name}.toml", fx, hooks=((layers["pythia"], "resid_post"),), name=f"gpu-check-{name}",
            train=train(name, ["pythia"], layers["pythia"], [batchtopk(f"k{k}", k) for k in ks], s["sweep_steps"]),
            **common)
    return configs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.inference_mode()
def forward_tokens_per_s(cfg, model: str, tokenset_id: str, n_seq: int, batch: int) -> float:
    """A plain forward with every hidden state (what a notebook does), on the token set's first
    sequences in the cache job's batches, after one untimed batch."""
    from pipeline import models as M
    from pipeline import store as S

    spec = cfg.model(model)
    device = M.resolve_device(spec.device)
    lm = M.load_model(spec, device=device)
    ts = S.open_token_set(S.StoreRoot(cfg.store), tokenset_id)
    n_seq = min(n_seq, ts.n_sequences)

    def run(lo, hi):
        for a in range(lo, hi, batch):
            ids = torch.from_numpy(ts.tokens[a:min(a + batch, hi)]).long().to(device)
            lm.model(ids, output_hidden_states=True, use_cache=False).hidden_states[-1].float().cpu()

    run(0, min(batch, n_seq))
    seconds, _ = timed(lambda: run(0, n_seq), device)
    return n_seq * ts.context_length / seconds


def trainer_consumption(cfg, steps: int) -> float:
    """Tokens/s the crosscoder's training steps consume when the batch is already on the device."""
    from pipeline import models as M
    from trainer.train import new_member, open_arrays, train_step

    train = cfg.train
    device = M.resolve_device(train.device)
    _, _, _, _, arrays = open_arrays(cfg, train)
    m = new_member(train.dictionaries[0], train, len(arrays), arrays[0].d_model, [a.scale for a in arrays], device)
    x = torch.randn(train.batch_size, len(arrays), arrays[0].d_model, device=device)
    for step in range(3):
        train_step(m, x, step, train)
    seconds, _ = timed(lambda: [train_step(m, x, 3 + i, train) for i in range(steps)], device)
    return steps * train.batch_size / seconds


def loader_tokens_per_s(cfg, n_batches: int) -> float:
    """The training loader alone, built as `mdiff train` builds it, onto the training device."""
    from pipeline import models as M
    from trainer.train import make_loader, open_arrays

    train = cfg.train
    device = M.resolve_device(train.device)
    _, ts, _, _, arrays = open_arrays(cfg, train)
    with make_loader(arrays, ts, train, "train", device) as ld:
        it = iter(ld)
        next(it)  # the first window, read before the first batch
        seconds, n = timed(lambda: sum(len(next(it).float()) for _ in range(n_batches)), device)
    return n / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="small shapes (chosen anyway without CUDA)")
    ap.add_argument("--work", help="work directory, kept (its store/ and runs/ are emptied first); default: a "
                    "temporary one, removed at the end")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when a check fails")
    args = ap.parse_args(argv)

    from evals.run import run_eval
    from mdiff.config import load_config
    from mdiff.tiny import make_corpus, make_tokenizer
    from pipeline.cache import run_cache
    from trainer.train import run_train

    cuda = torch.cuda.is_available()
    mode = "gpu" if cuda and not args.small else "small"
    s = SIZES[mode]
    device = torch.device("cuda" if cuda else "cpu")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mdiff-gpu-check-"))
    for old in ("store", "runs"):  # a rerun in the same folder measures again, reusing nothing
        shutil.rmtree(work / old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log = stamped_log()
    quiet = lambda *a, **k: None  # noqa: E731
    log(f"{mode} sizes on {torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}; work in {work}")

    files = make_corpus(work / "corpus", n_docs=max(400, s["n_tokens"] // 8))
    tokenizer = make_tokenizer(files["text"].read_text().split("\n\n")[:2000])
    fixture = {"corpus": files, "models": build_models(work, tokenizer, mode)}
    cfgs = {k: load_config(p) for k, p in write_configs(work, fixture, s, mode).items()}
    log("models, corpus and configs written")

    rows: list[dict] = []

    def row(stage, what, tps, ratio=None, check="", passed=None):
        rows.append({"stage": stage, "what": what, "tokens_per_s": tps, "ratio": ratio, "check": check,
                     "passed": passed})
        log(f"{stage}: {what}: {tps:,.0f} tokens/s" + (f", {ratio:.3g}x" if ratio is not None else ""))

    n_tok = s["n_tokens"] // s["ctx"] * s["ctx"]
    forward = {}
    for key, cfg, model, shape in [("crosscoder", cfgs["crosscoder"], "smol-a", "SmolLM2-135M"),
                                   ("sweep", cfgs["sweep"], "pythia", "Pythia-160M")]:
        seconds, report = timed(lambda cfg=cfg: run_cache(cfg, log=quiet, progress=False), device)
        forward[key] = forward_tokens_per_s(cfg, model, report.tokenset_id, n_tok // s["ctx"], s["cache_batch"])
        row("forward", f"{shape} shape, plain forward with output_hidden_states=True", forward[key], 1.0, "reference")
        for m in report.models:
            tps = n_tok / max(m.compute_seconds, 1e-9)
            ratio = tps / forward[key]
            row("cache", f"{shape} shape `{m.name}`, {cfg.hooks[0].label}, {n_tok:,} tokens "
                f"({seconds:.0f} s with loading)", tps, ratio, f">= {CACHE_TARGET}x forward", ratio >= CACHE_TARGET)

    cc = cfgs["crosscoder"]
    consume = trainer_consumption(cc, s["consume_steps"])
    row("train", f"BatchTopK crosscoder, {s['latents']:,} latents: train steps on a batch already on the device",
        consume, consume / forward["crosscoder"], "information")
    loader = loader_tokens_per_s(cc, s["loader_batches"])
    row("loader", "training loader alone (as `mdiff train` builds it, onto the device, .float())", loader,
        loader / consume, f">= {LOADER_TARGET}x the trainer's consumption", loader >= LOADER_TARGET * consume)
    seconds, _ = timed(lambda: run_train(cc, log=quiet, progress=False), device)
    row("train", f"`mdiff train`: the crosscoder end to end, {s['train_steps']} steps with setup and saving",
        s["train_steps"] * s["batch"] / seconds, s["train_steps"] * s["batch"] / seconds / forward["crosscoder"],
        "information")

    times = {}
    for name in ("single", "sweep", "single", "sweep"):  # alternated, medians
        t, _ = timed(lambda name=name: run_train(cfgs[name], log=quiet, progress=False), device)
        times.setdefault(name, []).append(t)
    t1, t4 = statistics.median(times["single"]), statistics.median(times["sweep"])
    tokens = s["sweep_steps"] * s["batch"]
    row("sweep", f"`mdiff train`: 1 SAE, Pythia-160M shape, {s['sweep_steps']} steps", tokens / t1,
        tokens / t1 / forward["sweep"], "information")
    row("sweep", "`mdiff train`: lockstep sweep of 4 SAEs, same steps (ratio: its time / one SAE's)", tokens / t4,
        t4 / t1, f"<= {SWEEP_TARGET}x one SAE's time", t4 <= SWEEP_TARGET * t1)

    seconds, _ = timed(lambda: run_eval(cc, progress=False, log=quiet), device)
    ev_tokens = s["eval_sequences"] * s["ctx"] * 2
    row("eval", f"`mdiff eval`: the crosscoder spliced into both models, {s['eval_sequences']} sequences each, "
        "analyses and browser", ev_tokens / seconds, ev_tokens / seconds / forward["crosscoder"], "information")

    print(render(rows, mode, torch.cuda.get_device_name() if cuda else "CPU"))
    failed = [r for r in rows if r["passed"] is False]
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "device": str(device), "torch": torch.__version__,
                                               "sizes": s, "rows": rows}, indent=1))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if args.strict and failed else 0


def render(rows: list[dict], mode: str, device: str) -> str:
    def result(r):
        return {True: "PASS", False: "FAIL", None: ""}[r["passed"]]

    lines = [f"| {r['stage']} | {r['what']} | {r['tokens_per_s']:,.0f} | "
             + ("" if r["ratio"] is None else f"{r['ratio']:.3g}") + f" | {r['check']} | {result(r)} |" for r in rows]
    note = "" if mode == "gpu" else ("\nSmall shapes on the CPU: these numbers only show that every stage ran; "
                                     "the checks are meant for the GPU sizes.\n")
    return (f"\n## GPU check ({mode} sizes, {device})\n\n| stage | what | tokens/s | ratio | check | result |\n"
            "|---|---|---:|---:|---|---|\n" + "\n".join(lines) + "\n" + note)


if __name__ == "__main__":
    raise SystemExit(main())
