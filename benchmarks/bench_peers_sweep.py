"""Training runs end to end, from the same model and tokens: a sweep of N TopK SAEs with ours (one
cache job, then one `mdiff train` run training the N in lockstep), SAELens (one cache job, then N
training runs from its cache: one SAE per run) and EleutherAI's sparsify (no cache: one run whose
every step runs the model and trains the N seeds on that batch).

Run it in the peers' environment:

    bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_sweep

Same tiny trained model and hook, same tokens (our token set's training sequences), `--steps`
steps of 4,096 tokens (32 sequences of 128), 2,048 latents, k 32, Adam lr 3e-4 without warm-up,
for N = 1 and N = `--sweep`. Every job is timed whole as a user runs it (model or store opening,
training, saving). SAELens trains without its norm-estimation pass (`normalize_activations="none"`:
the pass reads 1,000 batches first); ours normalizes in the cache job. The three alternate in
order; ratios are medians of per-repeat ratios. dictionary_learning has no cache of its own that
works with this transformers version (its nnsight buffer); its lockstep `trainSAE` is compared step
by step in the training-step section.
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
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

from benchmarks.common.helpers import (
    alternating,
    gpu_note,
    load_line,
    machine_info,
    machine_line,
    paired_ratio,
    peers_missing,
    stamped_log,
    write_section,
)
from benchmarks.common.peer_fixture import (
    add_common_args,
    recipe_from_args,
    saelens_hook_name,
    token_dataset,
    trained_tiny_model,
    write_experiment,
)
from mdiff.config import load_config
from pipeline import store as S
from pipeline.cache import run_cache
from trainer.train import run_train

try:
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )
    from sparsify import SaeConfig, TrainConfig, Trainer

    from benchmarks.common.saelens_cache import SAELensCache  # imports SAELens
except ImportError as e:  # pragma: no cover - the peers' environment is a separate venv
    sys.exit(peers_missing(e, "bench_peers_sweep"))

BATCH_SEQ = 32  # sequences per step: 4,096 tokens of 128


def train_section(out: Path, n: int, steps: int, latents: int, k: int, lr: float) -> dict:
    """The [train] section: n TopK SAEs (seeds 0..n-1) trained in lockstep."""
    return {"out_dir": str(out), "batch_size": 4096, "steps": steps, "lr": lr, "lr_warmup_steps": 0,
            "lr_decay_fraction": 0.0, "log_every": steps, "eval_every": steps, "eval_batches": 1,
            "checkpoint_every": steps, "buffer_tokens": 65536, "read_threads": 2, "device": "cpu",
            "dictionaries": [{"name": f"topk{i}", "architecture": "topk", "n_latents": latents, "k": k,
                              "seed": i} for i in range(n)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="training steps of 4,096 tokens")
    ap.add_argument("--sweep", type=int, default=4, help="SAEs in the sweep (also timed: 1)")
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    add_common_args(ap, "peers_sweep.json", repeats=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = stamped_log()

    lm = trained_tiny_model(args.work, recipe_from_args(args), log=log)
    work = args.work / f"sweep-{lm.recipe.key()}"
    ctx = lm.recipe.context_length
    tokens_per_step = BATCH_SEQ * ctx
    n_train_seq = args.steps * BATCH_SEQ + BATCH_SEQ  # one spare batch: our loader skips position 0
    n_seq = n_train_seq + n_train_seq // 8  # + a validation split for our end-of-run evaluation
    sizes = sorted({1, args.sweep})
    cfgs = {n: load_config(write_experiment(
        work / f"ours-{n}.toml", lm, store=work / "store", n_tokens=n_seq * ctx,
        validation_fraction=(n_seq - n_train_seq) / n_seq, shard_tokens=16384,
        train=train_section(work / f"runs-{n}", n, args.steps, args.latents, args.k, args.lr),
        name=f"bench-sweep-{n}")) for n in sizes}
    cfg0 = cfgs[sizes[0]]
    run_cache(cfg0, log=lambda *_: None, progress=False)  # the token set (both sides get tokens)
    root = S.StoreRoot(cfg0.store)
    ts = S.open_token_set(root, next(iter(root.list_names("tokensets", folders=True))))
    train_tokens = ts.tokens[: ts.n_train_sequences]
    sl_cache = SAELensCache(work / "saelens-cache", lm, token_dataset(train_tokens),
                            tokens=len(train_tokens) * ctx, dtype="float32", batch=BATCH_SEQ,
                            shard_tokens=16384)
    hook = saelens_hook_name(lm)

    def ours_cache() -> float:
        root.delete("activations")
        t0 = time.perf_counter()
        run_cache(cfg0, log=lambda *_: None, progress=False)
        return time.perf_counter() - t0

    def ours_train(n: int) -> float:
        shutil.rmtree(work / f"runs-{n}", ignore_errors=True)
        t0 = time.perf_counter()
        run_train(cfgs[n], log=lambda *_: None, progress=False)
        return time.perf_counter() - t0

    def saelens_runs(n: int) -> float:
        t0 = time.perf_counter()
        for seed in range(n):
            out = work / f"saelens-out-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = LanguageModelSAERunnerConfig(
                sae=TopKTrainingSAEConfig(d_in=lm.recipe.d_model, d_sae=args.latents, k=args.k,
                                          normalize_activations="none", device="cpu"),
                model_name=str(lm.path), model_class_name="AutoModelForCausalLM", hook_name=hook,
                dataset_path="local-tokens", is_dataset_tokenized=True, context_size=ctx,
                use_cached_activations=True, cached_activations_path=str(work / "saelens-cache"),
                training_tokens=args.steps * tokens_per_step, train_batch_size_tokens=tokens_per_step,
                store_batch_size_prompts=BATCH_SEQ, n_batches_in_buffer=512, lr=args.lr,
                lr_warm_up_steps=0, adam_beta1=0.9, adam_beta2=0.999, device="cpu", seed=seed,
                dtype="float32", n_checkpoints=0, checkpoint_path=None, output_path=str(out),
                logger=LoggingConfig(log_to_wandb=False), verbose=False)
            LanguageModelSAETrainingRunner(cfg, override_dataset=token_dataset(train_tokens)).run()
        return time.perf_counter() - t0

    def sparsify_run(n: int) -> float:
        from transformers import AutoModelForCausalLM

        save = work / "sparsify-out"
        shutil.rmtree(save, ignore_errors=True)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(lm.path)
        cfg = TrainConfig(SaeConfig(k=args.k, num_latents=args.latents), batch_size=BATCH_SEQ,
                          hookpoints=[f"layers.{lm.hook_layer}"], init_seeds=list(range(n)),
                          optimizer="adam", lr=args.lr, lr_warmup_steps=0, log_to_wandb=False,
                          save_every=10**9, save_dir=str(save))
        data = token_dataset(train_tokens[: args.steps * BATCH_SEQ], column="input_ids")
        Trainer(cfg, data, model).fit()
        return time.perf_counter() - t0

    jobs = {"ours/cache": ours_cache, "saelens/cache": sl_cache.run,
            **{f"ours/train{n}": (lambda n=n: ours_train(n)) for n in sizes},
            **{f"saelens/train{n}": (lambda n=n: saelens_runs(n)) for n in sizes},
            **{f"sparsify/train{n}": (lambda n=n: sparsify_run(n)) for n in sizes}}
    log("warm-up: one untimed pass of the caches and of one SAE per side (imports, first calls)")
    for name, fn in jobs.items():
        if name.endswith(("cache", "train1")):
            log(f"  {name}: {fn():.1f} s")
    load_before = os.getloadavg()
    seconds = {name: [] for name in jobs}
    cpu = {name: [] for name in jobs}
    for rep, order in alternating(list(jobs), args.repeats):
        # caches first in every repeat: the training jobs read them
        order = [j for j in order if j.endswith("cache")] + [j for j in order if not j.endswith("cache")]
        for name in order:
            c0 = time.process_time()
            seconds[name].append(jobs[name]())
            cpu[name].append(time.process_time() - c0)
            log(f"  [{rep + 1}/{args.repeats}] {name}: {seconds[name][-1]:.1f} s ({cpu[name][-1]:.1f} CPU-s)")
    load_after = os.getloadavg()

    def totals(sec: dict) -> dict:
        out = {}
        for n in sizes:
            out[f"ours/{n}"] = [c + t for c, t in zip(sec["ours/cache"], sec[f"ours/train{n}"])]
            out[f"saelens/{n}"] = [c + t for c, t in zip(sec["saelens/cache"], sec[f"saelens/train{n}"])]
            out[f"sparsify/{n}"] = sec[f"sparsify/train{n}"]
        return out

    total, total_cpu = totals(seconds), totals(cpu)
    ratios = {}
    for n in sizes:
        for peer in ("saelens", "sparsify"):
            ratios[f"total/{n}/{peer}"] = paired_ratio(total[f"{peer}/{n}"], total[f"ours/{n}"])
            ratios[f"total_cpu/{n}/{peer}"] = paired_ratio(total_cpu[f"{peer}/{n}"], total_cpu[f"ours/{n}"])
            ratios[f"train/{n}/{peer}"] = paired_ratio(seconds[f"{peer}/train{n}"], seconds[f"ours/train{n}"])
    result = {
        "machine": machine_info(),
        "setup": {"steps": args.steps, "tokens_per_step": tokens_per_step, "latents": args.latents,
                  "k": args.k, "lr": args.lr, "sweep_sizes": sizes, "repeats": args.repeats,
                  "cached_tokens": len(train_tokens) * ctx,
                  "model": {"d_model": lm.recipe.d_model, "n_layers": lm.recipe.n_layers,
                            "hook_layer": lm.hook_layer}},
        "seconds": seconds, "cpu_seconds": cpu, "total_seconds": total, "total_cpu_seconds": total_cpu,
        "ratios_ours_speed_over_peer": ratios,
        "load_average": {"before": load_before, "after": load_after},
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    body = render(result)
    write_section(Path(args.out), "peers-sweep", body)
    print(body)


def render(r: dict) -> str:
    s, sec, tot, q = r["setup"], r["seconds"], r["total_seconds"], r["ratios_ours_speed_over_peer"]

    def med(v):
        return statistics.median(v)

    data_tokens = s["steps"] * s["tokens_per_step"]
    rows = []
    for n in s["sweep_sizes"]:
        for side, what in (("ours", f"cache job + one `mdiff train` run with {n} dictionar{'y' if n == 1 else 'ies'}"),
                           ("saelens", f"CacheActivationsRunner + {n} `LanguageModelSAETrainingRunner` run{'s' if n > 1 else ''} from the cache"),
                           ("sparsify", f"one `Trainer.fit` with {n} seed{'s' if n > 1 else ''} (**runs the model every step**)")):
            t = med(tot[f"{side}/{n}"])
            train = med(sec[f"{side}/train{n}"])
            cache = f"{med(sec[f'{side}/cache']):.1f}" if f"{side}/cache" in sec else "none"
            r_tot = "1.00" if side == "ours" else f"{q[f'total/{n}/{side}']:.2f}"
            r_cpu = "1.00" if side == "ours" else f"{q[f'total_cpu/{n}/{side}']:.2f}"
            r_train = "1.00" if side == "ours" else f"{q[f'train/{n}/{side}']:.2f}"
            rows.append(f"| {n} | {side}: {what} | {cache} | {train:.1f} | {t:.1f} | {n * data_tokens / t:,.0f} | "
                        f"**{r_tot}** | {r_cpu} | {r_train} |")
    m = s["model"]
    faster = [f"{'SAELens' if side == 'saelens' else 'sparsify'} with {n} SAE{'s' if n > 1 else ''} "
              f"({q[f'total/{n}/{side}']:.2f} by wall clock, {q[f'total_cpu/{n}/{side}']:.2f} by CPU time)"
              for n in s["sweep_sizes"] for side in ("saelens", "sparsify")
              if max(q[f"total/{n}/{side}"], q[f"total_cpu/{n}/{side}"]) < 0.95]
    verdict = ("**Where a peer is faster end to end**: " + "; ".join(faster) + "."
               if faster else "No peer is faster end to end in this run (both clocks).")
    big = max(s["sweep_sizes"])
    marginal = ""
    if big > 1:  # seconds each further SAE adds per step: (N SAEs - 1 SAE) / ((N - 1) * steps)
        per = {side: (med(sec[f"{side}/train{big}"]) - med(sec[f"{side}/train1"])) / ((big - 1) * s["steps"])
               for side in ("ours", "saelens", "sparsify")}
        marginal = (f" Each further SAE cost, per step of {s['tokens_per_step']:,} tokens: ours {per['ours']:.2f} s, "
                    f"SAELens {per['saelens']:.2f} s (a whole run each), sparsify {per['sparsify']:.2f} s. "
                    "sparsify's SAE step decodes with `embedding_bag` over the k chosen decoder rows and its "
                    "fused encoder's backward accumulates only the k chosen rows (`index_add_`), so of the six "
                    "matmuls of a dense step only the encoder's forward remains; ours does the same on a CPU "
                    "when k / n_latents <= 1/16 (trainer/sparse_decode.py: `embedding_bag` decode, CSR products "
                    "for the decoder's and the encoder's gradients; see the training-step section).")
    return f"""## Peers: training runs end to end, one SAE and a sweep

{machine_line(r['machine'])}
{load_line(r['load_average']['before'], r['load_average']['after'])}
{gpu_note(r['machine'], '--d-model 2048 --latents 16384')}The tiny trained Llama (d_model {m['d_model']}, {m['n_layers']} layers), hook resid_post of layer {m['hook_layer']}, the same tokens
(cache jobs over {s['cached_tokens']:,} tokens). Each SAE: TopK, {s['latents']:,} latents, k {s['k']}, {s['steps']} steps of
{s['tokens_per_step']:,} tokens, Adam lr {s['lr']:g}, no warm-up. Jobs timed whole (model loads, store/cache opening,
saving); {s['repeats']} repeats in alternating order after an untimed pass of the one-SAE jobs. Sparsify has no cache: each of its steps runs
the whole model (all layers and the LM head) on 32 sequences, then trains its SAEs on that batch; its sweep is
several seeds in one run. SAELens' cache is float32, ours bfloat16.

| SAEs | job | cache job s | training s | total s | SAE-tokens/s (SAEs x tokens / total) | ours / it, total | same, by CPU time | ours / it, training only |
|---:|---|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

"ours / it" is how many times faster ours is (median of per-repeat ratios of seconds); below 1 the peer is faster.
"Training only" leaves the cache jobs out, which is the cost of every further sweep over an existing cache.

{verdict}{marginal} How the costs split: a cache job pays one forward per token (stopped after the hooked layer)
plus writing; every later run reads the cache instead of running the model. sparsify pays a forward
of the whole model (every layer and the LM head) for every batch of every run, but writes and reads
nothing, so for a single pass over the data it saves the write and the read; it loses as soon as the same
tokens are trained on again (a second sweep, more steps over the cache, a deeper model with an early
hook). SAELens trains one SAE per run, so its sweep loads the model (which its runner does even when
training from a cache), opens the cache and reads every batch N times, where ours reads it once for N.
Raw figures: `benchmarks/results/peers_sweep.json`. Reproduce: `bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_sweep`.
"""


if __name__ == "__main__":
    main()
