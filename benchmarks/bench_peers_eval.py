"""Splice evaluation against SAELens: our `evaluate_dictionary(splice="replace")` vs SAELens'
`run_evals` on the same SAE, model and tokens. The numbers must agree; then the time is compared.

Run it in the peers' environment:

    bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_eval

Setup: the briefly trained tiny Llama (CE is meaningless on random weights), its activations cached
as float32 (so that the SAE sees bit-for-bit the activations SAELens computes live), a TopK SAE
trained on them with `mdiff train`, and the same SAE exported to SAELens' format
(`trainer.formats.saelens.export`: the normalization scale folded in, no activation scaler needed) and
loaded with SAELens' `SAE.load_from_disk`. Both evaluate the
first `--sequences` validation sequences of our token set (SAELens reads them, in order, from a
pre-tokenized dataset), batches of `--batch` sequences.

Conventions, and how they are matched: we splice positions >= 1 and score CE at positions 1..T-2;
SAELens, told to exclude the BOS token id (which our sequences carry at position 0 only), splices
and scores every other position, which gives the same positions for CE, explained variance, L0 and
the norms. Its KL also counts position T-1 (no CE target there), so KL agrees within a stated
tolerance rather than to rounding. Its zero ablation also zeroes position 0 (ours keeps it), so the
ablation CE and the scores built on it differ by convention: shown, not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch

from benchmarks.common.helpers import (
    agreement,
    alternating,
    gpu_note,
    load_line,
    machine_info,
    machine_line,
    paired_ratio,
    peers_missing,
    stamped_log,
    timed,
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
from evals.splice import evaluate_dictionary
from mdiff.config import load_config
from pipeline import store as S
from pipeline.cache import run_cache
from trainer.dictionaries import load_dictionary
from trainer.formats.saelens import export
from trainer.train import run_train

try:
    from sae_lens import SAE, ActivationsStore
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.load_model import load_model
    from sae_lens.training.activation_scaler import ActivationScaler
except ImportError as e:  # pragma: no cover - the peers' environment is a separate venv
    sys.exit(peers_missing(e, "bench_peers_eval"))

# metric: (ours per-model key, SAELens group, SAELens key, relative tol, absolute tol)
COMPARED = {
    "ce_loss_without_sae": ("model_performance_preservation", "ce_loss_without_sae", 1e-4, 0.0),
    "ce_loss_with_sae": ("model_performance_preservation", "ce_loss_with_sae", 1e-4, 0.0),
    "kl_div_with_sae": ("model_behavior_preservation", "kl_div_with_sae", 0.02, 0.0),
    "explained_variance": ("reconstruction_quality", "explained_variance", 0.0, 1e-3),
    "cossim": ("reconstruction_quality", "cossim", 0.0, 1e-4),
    "l2_ratio": ("shrinkage", "l2_ratio", 0.0, 1e-4),
}
NOT_COMPARED = {  # conventions differ: SAELens also zero-ablates position 0
    "ce_loss_with_ablation": ("model_performance_preservation", "ce_loss_with_ablation"),
    "ce_loss_score": ("model_performance_preservation", "ce_loss_score"),
    "kl_div_with_ablation": ("model_behavior_preservation", "kl_div_with_ablation"),
}

def train_section(out: Path, steps: int, latents: int, k: int) -> dict:
    """The [train] section: one TopK SAE."""
    return {"out_dir": str(out), "batch_size": 4096, "steps": steps, "lr": 1e-3, "lr_warmup_steps": 10,
            "lr_decay_fraction": 0.2, "log_every": 50, "eval_every": steps, "checkpoint_every": steps,
            "buffer_tokens": 65536, "read_threads": 2, "device": "cpu",
            "dictionaries": [{"name": "topk", "architecture": "topk", "n_latents": latents, "k": k}]}


def saelens_sae(dict_dir: Path, out: Path, hook_name: str, ctx: int):
    """Our SAE exported with `trainer.formats.saelens.export` (normalization scale folded in, so no
    activation scaler is needed) and loaded by SAELens' own `SAE.load_from_disk`. The export names
    the TransformerLens hook; the Hugging Face path (HookedProxyLM) hooks the module, so the
    loaded SAE is pointed at that instead."""
    ours = load_dictionary(dict_dir)
    meta = json.loads((dict_dir / "config.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    export(ours, out, hook=meta["hook"], model_name="tiny", context_size=ctx)
    sae = SAE.load_from_disk(str(out), device="cpu")
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.prepend_bos = True
    return sae.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=131072, help="token set size (training + validation)")
    ap.add_argument("--validation-fraction", type=float, default=0.0625)
    ap.add_argument("--sequences", type=int, default=32, help="validation sequences evaluated")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch, both sides")
    ap.add_argument("--latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=150)
    add_common_args(ap, "peers_eval.json", repeats=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = stamped_log()

    lm = trained_tiny_model(args.work, recipe_from_args(args), log=log)
    work = args.work / f"eval-{lm.recipe.key()}-m{args.latents}-k{args.k}-s{args.train_steps}"
    ctx = lm.recipe.context_length
    train = train_section(work / "runs", args.train_steps, args.latents, args.k)
    cfg_path = write_experiment(work / "experiment.toml", lm, store=work / "store", n_tokens=args.tokens,
                                validation_fraction=args.validation_fraction, storage_dtype="float32",
                                train=train, name="bench-peers-eval")
    cfg = load_config(cfg_path)
    dict_dir = work / "runs" / "topk"
    if not (dict_dir / "dictionary.safetensors").exists():
        log("caching (float32) and training the TopK SAE")
        run_cache(cfg, log=log, progress=False)
        shutil.rmtree(work / "runs", ignore_errors=True)
        run_train(cfg, log=log, progress=False)
    meta = json.loads((dict_dir / "config.json").read_text())
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    seqs = ts.tokens[ts.n_train_sequences: ts.n_train_sequences + args.sequences]
    if len(seqs) != args.sequences or args.sequences % args.batch:
        sys.exit(f"need {args.sequences} validation sequences (a multiple of --batch {args.batch}); "
                 f"the token set has {ts.n_sequences - ts.n_train_sequences}")
    bos = int(seqs[0, 0])
    assert (seqs[:, 0] == bos).all() and not (seqs[:, 1:] == bos).any(), "BOS must sit at position 0 only"

    hook_name = saelens_hook_name(lm)
    sae = saelens_sae(dict_dir, work / "saelens-sae", hook_name, ctx)
    model = load_model("AutoModelForCausalLM", str(lm.path), device="cpu", hook_names=[hook_name])
    dataset = token_dataset(seqs)
    n_batches = args.sequences // args.batch
    eval_cfg = EvalConfig(batch_size_prompts=args.batch, n_eval_reconstruction_batches=n_batches,
                          n_eval_sparsity_variance_batches=n_batches, compute_kl=True,
                          compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
                          compute_variance_metrics=True)
    models_cache: dict = {}

    def ours() -> dict:
        return evaluate_dictionary(dict_dir, cfg, out_dir=None, n_sequences=args.sequences,
                                   batch_size=args.batch, device="cpu", progress=False,
                                   models_cache=models_cache, splice="replace")

    def peer() -> dict:
        store = ActivationsStore.from_sae(model, sae, dataset=dataset, context_size=ctx, streaming=False,
                                          store_batch_size_prompts=args.batch)
        metrics, _ = run_evals(sae, store, model, ActivationScaler(), eval_cfg,
                               exclude_special_tokens=[bos])
        return metrics

    runs = {"ours": ours, "saelens": peer}
    out = {name: fn() for name, fn in runs.items()}  # untimed: loads, first-call allocations
    log("warm-up done")
    load_before = os.getloadavg()
    seconds = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for rep, order in alternating(list(runs), args.repeats):
        for name in order:
            wall, cpu_s, out[name] = timed(runs[name])
            seconds[name].append(wall)
            cpu[name].append(cpu_s)
            log(f"  [{rep + 1}/{args.repeats}] {name}: {wall:.2f} s ({cpu_s:.2f} CPU-s)")
    load_after = os.getloadavg()

    ours_m = out["ours"]["metrics"]["per_model"]["tiny"]
    peer_m = out["saelens"]
    rows, failed = {}, []
    for key, (group, pkey, rel, abs_) in COMPARED.items():
        o, p = ours_m[key], peer_m[group][pkey]
        ok = agreement(o, p, rel=rel, abs_=abs_)
        rows[key] = {"ours": o, "saelens": p, "rel_tol": rel, "abs_tol": abs_, "agree": ok}
        if not ok:
            failed.append(key)
    o, p = out["ours"]["metrics"]["l0"], peer_m["sparsity"]["l0"]
    rows["l0"] = {"ours": o, "saelens": p, "rel_tol": 1e-6, "abs_tol": 0.0, "agree": agreement(o, p, rel=1e-6)}
    failed += [] if rows["l0"]["agree"] else ["l0"]
    shown = {key: {"ours": ours_m[key], "saelens": peer_m[g][k]} for key, (g, k) in NOT_COMPARED.items()}
    n_tok = args.sequences * (ctx - 1)
    result = {
        "machine": machine_info(),
        "setup": {"sequences": args.sequences, "batch": args.batch, "context_length": ctx,
                  "latents": args.latents, "k": args.k, "train_steps": args.train_steps,
                  "repeats": args.repeats, "model": {"d_model": lm.recipe.d_model, "n_layers": lm.recipe.n_layers,
                                                     "hook_layer": lm.hook_layer, "train_steps": lm.recipe.steps,
                                                     "final_train_loss": lm.final_loss}},
        "seconds": seconds, "cpu_seconds": cpu,
        "ratio_ours_over_saelens_speed": paired_ratio(seconds["saelens"], seconds["ours"]),
        "ratio_ours_over_saelens_speed_cpu": paired_ratio(cpu["saelens"], cpu["ours"]),
        "evaluated_tokens": n_tok,
        "compared": rows, "not_compared": shown,
        "ours": out["ours"], "saelens": peer_m,
        "load_average": {"before": load_before, "after": load_after},
    }
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    body = render(result)
    write_section(Path(args.out), "peers-eval", body)
    print(body)
    if failed:
        sys.exit(f"ours and SAELens disagree beyond the stated tolerance on: {', '.join(failed)}")


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def render(r: dict) -> str:
    s, sec = r["setup"], r["seconds"]
    med = {k: statistics.median(v) for k, v in sec.items()}
    rows = []
    for key, c in r["compared"].items():
        tol = " or ".join(t for t in ((f"rel {c['rel_tol']:g}" if c["rel_tol"] else ""),
                                      (f"abs {c['abs_tol']:g}" if c["abs_tol"] else "")) if t)
        diff = abs(c["ours"] - c["saelens"])
        rows.append(f"| {key} | {_fmt(c['ours'])} | {_fmt(c['saelens'])} | {diff:.2g} | {tol} | "
                    f"{'yes' if c['agree'] else '**NO**'} |")
    for key, c in r["not_compared"].items():
        rows.append(f"| {key} | {_fmt(c['ours'])} | {_fmt(c['saelens'])} | | not compared: SAELens "
                    f"zero-ablates position 0 too | |")
    m = s["model"]
    n_tok = r["evaluated_tokens"]
    return f"""## Peers: splice evaluation (ours vs SAELens `run_evals`)

{machine_line(r['machine'])}
{load_line(r['load_average']['before'], r['load_average']['after'])}
{gpu_note(r['machine'], '--d-model 2048 --latents 16384')}Model: the tiny Llama (d_model {m['d_model']}, {m['n_layers']} layers) trained {m['train_steps']} steps (final training loss
{m['final_train_loss']:.2f}); hook resid_post of layer {m['hook_layer']}, cached as float32. SAE: ours, TopK, {s['latents']:,} latents,
k {s['k']}, {s['train_steps']} steps of 4,096 tokens with `mdiff train`; SAELens gets it through our exporter
(`trainer.formats.saelens.export`, the normalization scale folded in) and its own `SAE.load_from_disk`. Both evaluate the same {s['sequences']} validation sequences of {s['context_length']} tokens in
batches of {s['batch']}: ours `evaluate_dictionary(splice="replace")` (SAELens' convention: the reconstruction
replaces the activation), SAELens `run_evals` with KL, CE, L2 norms, sparsity and variance metrics, BOS excluded.
Models loaded beforehand on both sides; {s['repeats']} timed repeats in alternating order after one warm-up.

| metric | ours | SAELens | difference | tolerance | agree |
|---|---:|---:|---:|---|---|
{chr(10).join(rows)}

CE, explained variance, L0 and the norms are over the same positions (1..T-2 for CE, 1..T-1 for the
rest). SAELens' KL also averages position T-1, which has no CE target and which ours leaves out:
hence the looser KL tolerance. The script exits with an error when a compared metric is outside its tolerance.

| what | seconds (median) | evaluated tokens/s |
|---|---:|---:|
| ours: `evaluate_dictionary` (4 variants: clean, spliced, zero, mean, one stacked forward per batch; store reads) | {med['ours']:.2f} | {n_tok / med['ours']:,.0f} |
| SAELens: `run_evals` (3 forwards per batch for CE/KL, then 1 forward to the hook for the variance metrics) | {med['saelens']:.2f} | {n_tok / med['saelens']:,.0f} |

Ours / SAELens in speed (median of per-repeat ratios): **{r['ratio_ours_over_saelens_speed']:.2f}** by wall clock,
{r['ratio_ours_over_saelens_speed_cpu']:.2f} by process CPU time (the steadier figure on a shared machine). Ours also computes the
mean-ablation variant, which SAELens does not; SAELens runs the model a fourth time for its variance metrics, where
ours reads the cached activations.
Raw figures: `benchmarks/results/peers_eval.json`. Reproduce: `bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_peers_eval`.
"""


if __name__ == "__main__":
    main()
