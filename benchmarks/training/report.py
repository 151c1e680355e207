"""The BENCHMARKS.md section of `benchmarks.bench_train`: the paired ratios derived from its raw
figures, and the section rendered from them."""

from __future__ import annotations

import statistics

import torch


def paired_ratio(num: list[tuple], den: list[tuple], i: int) -> float:
    """Median over rounds of num/den, measured in the same round (i: 0 wall, 1 CPU time)."""
    return statistics.median(a[i] / b[i] for a, b in zip(num, den, strict=True))


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
Raw figures: `benchmarks/results/train.json`. Reproduce: `bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.bench_train`.
"""
