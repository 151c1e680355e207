"""The toy ground-truth study: does a dictionary find the true features, and at which L0?

    python -m mdiff.toy_study runs/toy [--config study.toml] [--no-progress]

1. A synthetic distribution with known features and a known true L0 (mdiff/synthetic.py) is
   written into an mdiff store, through the store's shard records and checksums, and verified.
2. One `mdiff train` run trains, in lockstep on the same batches, a BatchTopK SAE at every k of a
   sweep around the true L0, plus k-schedule runs that start above or below and end at the true L0.
3. Each SAE is scored against the true features (evals/ground_truth.py): features recovered,
   cosine matrix, variance explained next to the ground-truth dictionary at the same k, and the
   decoder-projection curves from which the true L0 is estimated without looking at it.
4. Plots (PNG), `summary.md`, `summary.csv` and `summary.json` go to the output folder.

Rerunning resumes: the store and finished training are reused, interrupted training continues
from its last checkpoint. An output folder holding a study with other settings is refused.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tomli_w
import torch
from tqdm.auto import tqdm

from evals import ground_truth as G
from evals.plots import figure
from mdiff.config import ExperimentConfig
from mdiff.synthetic import (
    ToyGenerator,
    ToySpec,
    ToyStoreSpec,
    build_toy_experiment,
    check_toy_spec,
    load_generator,
)
from pipeline import store as S
from pipeline.config_files import dump_config
from pipeline.records import atomic_write_text
from pipeline.typed_config import ConfigError, Rules, from_mapping, problem
from trainer.dictionaries import load_dictionary
from trainer.train import run_train

STUDY_FILE = "study.json"


@dataclass(frozen=True)
class ToyStudySpec:
    """Everything the study does; the defaults are the reference toy setting (true L0 10.95)."""

    generator: ToySpec = field(default_factory=ToySpec)
    data: ToyStoreSpec = field(default_factory=ToyStoreSpec)
    ks: list[int] | None = None  # the sweep; default 2, L/2, L-3, L-1, L, L+1, L+3, L+6, 2L-2 (L: true L0)
    transition_from: list[int] | None = None  # k schedules from these (default: 2L and 2) ...
    transition_to: int | None = None  # ... to this k (default: the true L0, rounded)
    transition_steps: int | None = None  # over this many steps (default: half the steps)
    n_latents: int | None = None  # default: one latent per true feature
    steps: int = 4000
    batch_size: int = 512
    lr: float = 2e-3
    lr_warmup_steps: int = 100
    dead_after_batches: int = 10  # a latent silent this long is dead (and AuxK revives it)
    seed: int = 0
    eval_rows: int = 32768  # validation rows the metrics use
    recovered_above: float = G.RECOVERED_ABOVE


def _check_study(values: dict, where: str, errors: list[str]) -> None:
    ks = values.get("ks")
    if ks is not None and (not ks or min(ks) < 1):
        problem(errors, "ks", f"is {ks}", "list the k values of the sweep, each >= 1, e.g. [2, 5, 8, 11]")
    for key in ("steps", "batch_size", "eval_rows", "dead_after_batches"):
        if key in values and values[key] < 1:
            problem(errors, key, f"is {values[key]}", "use a positive count")
    if "lr" in values and values["lr"] <= 0:
        problem(errors, "lr", f"is {values['lr']}", "use a positive learning rate")
    for key in ("transition_to", "transition_steps", "n_latents"):
        if values.get(key) is not None and values[key] < 1:
            problem(errors, key, f"is {values[key]}", "use a positive count or leave it out")
    if any(k < 1 for k in values.get("transition_from") or []):
        problem(errors, "transition_from", f"is {values['transition_from']}", "give k values >= 1")
    if "recovered_above" in values and not 0 < values["recovered_above"] < 1:
        problem(errors, "recovered_above", f"is {values['recovered_above']}", "use a cosine in (0, 1)")
    n_lat = values.get("n_latents") or getattr(values.get("generator"), "n_features", None)
    for key in ("ks", "transition_from", "transition_to"):
        v = values.get(key)
        top = max(v, default=0) if isinstance(v, list) else v or 0
        if n_lat is not None and top > n_lat:
            problem(errors, key, f"asks for k = {top} with {n_lat} latents",
                    "keep every k at most n_latents (default: the number of features)")


def load_study_spec(path: str | Path) -> ToyStudySpec:
    """A study spec from TOML: top-level keys, [generator] and [data] tables; all checked at once."""
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(path), [f"cannot read it: {e} (fix the file)"]) from None
    errors: list[str] = []
    rules = Rules(checks={ToySpec: check_toy_spec, ToyStudySpec: _check_study})
    spec = from_mapping(ToyStudySpec, data, "", errors, rules)
    if errors or spec is None:
        raise ConfigError(str(path), errors or ["(top level): the study spec is invalid"])
    return spec


# -- the experiment --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Member:
    name: str
    k: int
    k_start: int | None = None

    @property
    def is_sweep(self) -> bool:
        return self.k_start is None


def members(spec: ToyStudySpec, gen: ToyGenerator) -> list[Member]:
    """The sweep (one SAE per k) and the k-schedule runs, all trained in one lockstep run."""
    n_latents = spec.n_latents or gen.n_features
    true = max(1, round(gen.true_l0))
    target = spec.transition_to or true
    ks = spec.ks or [2, true // 2, true - 3, true - 1, true, true + 1, true + 3, true + 6, 2 * true - 2]
    starts = spec.transition_from if spec.transition_from is not None else [2 * true, 2]
    out = [Member(f"k{k:02d}", k) for k in sorted({k for k in ks if 1 <= k <= n_latents})]
    out += [Member(f"k{a:02d}-to-{target:02d}", target, a)
            for a in starts if a != target and 1 <= a <= n_latents]
    return out


def train_section(spec: ToyStudySpec, gen: ToyGenerator, out_dir: Path) -> dict:
    """The [train] section as data: every member in one lockstep run over the same batches."""
    n_latents = spec.n_latents or gen.n_features
    span = spec.transition_steps or spec.steps // 2
    log_every = max(1, min(50, spec.steps // 20))
    checkpoint_every = log_every * max(1, spec.steps // (4 * log_every))  # resumable, in whole logs
    entries = [{"name": m.name, "architecture": "batchtopk", "n_latents": n_latents, "k": m.k,
                **({"k_start": m.k_start, "k_schedule_steps": span} if m.k_start else {})}
               for m in members(spec, gen)]
    return {"out_dir": str((out_dir / "train").resolve()), "batch_size": spec.batch_size, "steps": spec.steps,
            "lr": spec.lr, "lr_warmup_steps": spec.lr_warmup_steps, "seed": spec.seed, "log_every": log_every,
            "eval_every": spec.steps, "checkpoint_every": checkpoint_every,
            "dead_after_tokens": spec.dead_after_batches * spec.batch_size,
            "buffer_tokens": max(spec.batch_size, min(65536, spec.data.n_tokens // 4)), "read_threads": 2,
            "include_first_position": True, "device": "cpu", "dictionaries": entries}


def _claim(out_dir: Path, spec: ToyStudySpec) -> None:
    """One study per folder: refuse to mix a rerun's outputs with another setting's."""
    path = out_dir / STUDY_FILE
    mine = dump_config(spec)
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            why = (f"{out_dir} holds a study with other settings ({', '.join(diff)} differ) "
                   "(use another output folder, or delete this one)")
            raise ConfigError(str(path), [why])
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(mine, indent=1, sort_keys=True) + "\n")


def _trained(cfg: ExperimentConfig, names: list[str]) -> bool:
    out = Path(cfg.train.out_dir)
    for n in names:
        meta = out / n / "config.json"
        if not meta.exists() or json.loads(meta.read_text()).get("steps") != cfg.train.steps:
            return False
    return True


def _validation_rows(cfg: ExperimentConfig, array_path: str, n: int) -> torch.Tensor:
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    arr = S.open_activation_array(root, array_path, require_complete=True)
    ts = S.open_token_set(root, arr.attrs["tokenset_id"])
    lo = ts.n_train_sequences * ts.context_length
    hi = min(arr.n_rows, lo + n)
    return S.read_rows(arr, lo, hi).float()[:, None, :]


def _logged_k(metrics: Path, name: str) -> tuple[int | None, int | None]:
    ks = [r["k"] for r in map(json.loads, metrics.read_text().splitlines())
          if r.get("dictionary") == name and "k" in r]
    return (ks[0], ks[-1]) if ks else (None, None)


# -- evaluation ------------------------------------------------------------------------------------
def score(cfg: ExperimentConfig, array_path: str, spec: ToyStudySpec, gen: ToyGenerator,
          out_dir: Path, progress: bool = True
          ) -> tuple[list[dict], dict[str, dict[int, float]], dict[str, list[float]]]:
    """One row of metrics per member, each member's decoder projections and, per true feature,
    its best cosine with a decoder row."""
    x = _validation_rows(cfg, array_path, spec.eval_rows)
    train_dir = Path(cfg.train.out_dir)
    ms = members(spec, gen)
    n_latents = spec.n_latents or gen.n_features
    ns = list(range(1, min(n_latents - 1, 2 * max(m.k for m in ms)) + 1))
    rows, dps, best = [], {}, {}
    for m in tqdm(ms, desc="scoring", unit="SAE", disable=not progress, dynamic_ncols=True):
        sae = load_dictionary(train_dir / m.name)
        meta = json.loads((train_dir / m.name / "config.json").read_text())
        rec = G.feature_recovery(gen.features, sae, spec.recovered_above)
        cos = G.cosine_matrix(gen.features, G.decoder_rows(sae))
        G.plot_cosine_matrix(cos, out_dir / "cosines" / f"{m.name}.png",
                             f"{m.name}: {rec.n_recovered}/{gen.n_features} features recovered "
                             f"(cos > {spec.recovered_above}), true L0 {gen.true_l0:.2f}")
        dps[m.name] = G.decoder_projections(sae, x, ns)
        best[m.name] = [round(float(c), 4) for c in rec.best_cosine]
        with torch.no_grad():
            sae.eval()
            val_l0 = float((sae.encode(x) > 0).sum(1).float().mean())
        first_k, last_k = _logged_k(train_dir / "metrics.jsonl", m.name)
        rows.append({
            "dictionary": m.name, "k": m.k, "k_start": m.k_start if m.k_start else "",
            "k_logged": f"{first_k}->{last_k}",
            "recovered": rec.n_recovered, "n_features": gen.n_features,
            "recovered_fraction": round(rec.fraction, 4),
            "mean_best_cosine": round(float(rec.best_cosine.mean()), 4),
            "min_best_cosine": round(float(rec.best_cosine.min()), 4),
            "ve": round(G.variance_explained(sae, x, m.k), 4),
            "ve_ground_truth": round(G.variance_explained(G.ground_truth_dictionary(gen.features, m.k), x, m.k), 4),
            "val_l0": round(val_l0, 2), "dead": meta.get("dead_latents"),
        })
    return rows, dps, best


def _plot_lines(path: Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str,
                title: str, vlines: dict[str, float]) -> Path:
    fig, axes = figure(size=(6.0, 3.6))
    ax = axes[0, 0]
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=label)
    for i, (label, x) in enumerate(vlines.items()):
        ax.axvline(x, color=("#d62728", "#2ca02c")[i % 2], ls="--", lw=1, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
    return path


def _write_tables(out_dir: Path, rows: list[dict], header_lines: list[str]) -> None:
    cols = list(rows[0])
    with (out_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = ["# Toy ground-truth study", "", *header_lines, "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")


@dataclass
class StudyResult:
    out_dir: Path
    true_l0: float
    empirical_l0: float
    estimate: G.L0Estimate
    rows: list[dict]
    decoder_projections: dict[str, dict[int, float]]
    best_cosine: dict[str, list[float]]  # per dictionary, per true feature
    store: dict


def run_study(spec: ToyStudySpec, out_dir: str | Path, *, log=print, progress: bool = True) -> StudyResult:
    out = Path(out_dir)
    _claim(out, spec)
    gen = ToyGenerator.from_spec(spec.generator)
    codes = gen.sample(spec.eval_rows, stream=1 << 40)[1]
    empirical_l0 = float((codes > 0).sum(1).float().mean())
    log(f"toy: {gen.n_features} features in {gen.d_model} dimensions, true L0 {gen.true_l0:.3f} "
        f"(sampled {empirical_l0:.3f})")
    # mdiff.synthetic appends its `train` as TOML text to the config it writes
    train = tomli_w.dumps({"train": train_section(spec, gen, out)})
    cfg, written = build_toy_experiment(out, gen, spec.data, train=train,
                                        log=log, progress=progress)
    gen = load_generator(cfg.models[0].path)  # the stored generator: what the store was made of
    arr = S.open_activation_array(S.StoreRoot(cfg.store), written.array_path, require_complete=True)
    bad = S.verify_array(arr)
    if bad:
        raise S.StoreError(f"{arr.path}: {len(bad)} chunk(s) fail their checksums, e.g. {bad[0].reason}")
    log(f"store verified: {len(arr.chunk_checksums())} chunks, scale {arr.scale:.6g}")
    ms = members(spec, gen)
    if _trained(cfg, [m.name for m in ms]):
        log(f"training already done in {cfg.train.out_dir}; reusing it")
    else:  # continues from the last checkpoint of an interrupted run
        resume = (Path(cfg.train.out_dir) / "checkpoints" / "latest.json").exists()
        run_train(cfg, resume=resume, log=log, progress=progress)
    rows, dps, best = score(cfg, written.array_path, spec, gen, out, progress)

    sweep = [m for m in ms if m.is_sweep]
    ns = sorted(next(iter(dps.values())))
    curves = {n: [dps[m.name][n] for m in sweep] for n in ns}
    est = G.estimate_true_l0([m.k for m in sweep], curves)
    ks = [m.k for m in sweep]
    by_name = {r["dictionary"]: r for r in rows}
    marks = {f"true L0 {gen.true_l0:.2f}": gen.true_l0}
    if est.estimate is not None:
        marks[f"estimate {est.estimate:g}"] = est.estimate
    shown = sorted(est.per_n) or ns[: min(len(ns), 4)]
    _plot_lines(out / "decoder_projection.png", {f"n={n}": (ks, curves[n]) for n in shown},
                xlabel="k of the SAE", ylabel="decoder projection dp_n", vlines=marks,
                title="n-th decoder projection across the k sweep (curves used by the estimate)")
    _plot_lines(out / "recovery.png", {"features recovered": (ks, [by_name[m.name]["recovered"] for m in sweep])},
                xlabel="k of the SAE", ylabel=f"features with cosine > {spec.recovered_above}",
                vlines=marks, title=f"recovered features of {gen.n_features}")
    _plot_lines(out / "variance_explained.png",
                {"learned SAE": (ks, [by_name[m.name]["ve"] for m in sweep]),
                 "ground-truth dictionary": (ks, [by_name[m.name]["ve_ground_truth"] for m in sweep])},
                xlabel="k", ylabel="variance explained", vlines=marks,
                title="sparsity vs reconstruction: learned and ground-truth dictionaries")

    estimate_text = "none (no decoder-projection curve reaches a floor: widen the sweep)" \
        if est.estimate is None else f"{est.estimate:g}"
    header = [(f"- generator: {gen.n_features} features, d_model {gen.d_model}, true L0 "
               f"{gen.true_l0:.3f} (sampled {empirical_l0:.3f})"),
              f"- store: {arr.n_rows:,} rows, {arr.storage_dtype}, scale {arr.scale:.6g}, verified",
              f"- training: {spec.steps} steps x {spec.batch_size} rows, lr {spec.lr}, lockstep",
              f"- L0 estimate from decoder projections: {estimate_text}; per n: "
              + (", ".join(f"n={n}: k={k}" for n, k in est.per_n.items()) or "-"),
              "- argmin of dp_n per n: " + ", ".join(f"n={n}: k={k}" for n, k in est.argmin_per_n.items())]
    _write_tables(out, rows, header)
    store = {"tokenset_id": written.tokenset_id, "array": written.array_path, "scale": arr.scale,
             "rows": arr.n_rows, "verified_chunks": len(arr.chunk_checksums())}
    result = StudyResult(out, gen.true_l0, empirical_l0, est, rows, dps, best, store)
    (out / "summary.json").write_text(json.dumps(
        {"true_l0": gen.true_l0, "empirical_l0": empirical_l0, "estimate": dataclasses.asdict(est),
         "rows": rows, "decoder_projections": dps, "best_cosine": best, "store": store},
        indent=1, default=_json))
    log((out / "summary.md").read_text())
    return result


def _json(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(type(o).__name__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdiff.toy_study", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", default="runs/toy", help="output folder (default runs/toy)")
    p.add_argument("--config", help="study spec (TOML): top-level keys, [generator], [data]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # toy-sized matrices: one thread is fastest, more only contend
    try:
        spec = load_study_spec(args.config) if args.config else ToyStudySpec()
        run_study(spec, args.out_dir, progress=not args.no_progress)
    except (ConfigError, S.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
