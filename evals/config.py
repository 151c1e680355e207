"""The `[eval]` section: which dictionaries are spliced back, on how much data, and what is shown."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from evals.analysis_specs import DiffLensSpec, LatentScalingSpec, check_lens_models, check_scaling_models
from evals.analysis_specs import rules as analysis_rules
from evals.browser.spec import BrowserSpec
from evals.browser.spec import rules as browser_rules
from evals.saebench import config as saebench_config
from evals.saebench.config import SaeBenchSpec
from pipeline.config_checks import absolute_path, check_name, check_size
from pipeline.typed_config import Check, join_key, problem, show
from trainer.config import TrainExperiment


@dataclass(frozen=True)
class TokenClassSpec:
    """A named set of token positions, for per-class latent statistics (e.g. chat-template tokens)."""

    name: str
    kind: Literal["tokens", "regex", "special"]  # listed token strings | regex on the decoded token | special tokens
    values: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvalSpec:
    dictionaries: list[str] = field(default_factory=list)  # names from [train]; default: all
    n_sequences: int = 256  # validation sequences spliced per model (each costs model forwards)
    # validation rows (tokens) the store-only analyses stream over (firing frequencies, per-text
    # preferences and reconstruction, top contexts); the whole split when it is smaller
    scan_rows: int = 262_144
    batch_size: int = 8  # sequences per forward pass
    # which relative decoder norm sorts a 2-model crosscoder's latents into classes (both are written
    # per latent): "r" = |d_B| / (|d_A| + |d_B|) (Anthropic; Kissane et al.), "delta" = Minder et al.'s
    # 1/2 ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1); evals/decoder_norms.py has the rules
    relative_norm: Literal["r", "delta"] = "r"
    specific_below: float = 0.1  # 2 models: relative norm below this -> specific to the first model
    specific_above: float = 0.9  # ... above this -> specific to the second model
    shared_band: list[float] | None = None  # relative norm -> shared; default r [0.3, 0.7], delta [0.4, 0.6]
    # an SAE of model A run on model B's rows: "source" feeds B in A's units (stored_B * s_A / s_B,
    # i.e. s_A * raw B, as transfer studies feed raw activations); "stored" feeds B's own normalized rows
    transfer_units: Literal["source", "stored"] = "source"
    top_latents: int = 50  # latents shown in the HTML page and the CSV
    contexts_per_latent: int = 8  # top-activating text snippets per latent
    context_tokens: int = 12  # tokens of context on each side of a snippet's token
    token_classes: list[TokenClassSpec] = field(default_factory=list)
    out_dir: str | None = None  # default: <train.out_dir>/eval
    device: str = "auto"
    latent_scaling: LatentScalingSpec | None = None  # [eval.latent_scaling]: Latent Scaling of each crosscoder
    browser: BrowserSpec = field(default_factory=BrowserSpec)  # [eval.browser]: the latent browser's pass
    diff_lens: DiffLensSpec | None = None  # [eval.diff_lens]: activation-difference lens of two models


DEFAULT_SHARED_BAND = {"r": (0.3, 0.7), "delta": (0.4, 0.6)}


def shared_band(spec: EvalSpec) -> tuple[float, float]:
    """The shared band as configured, else the relative-norm convention's usual one."""
    band = spec.shared_band if spec.shared_band is not None else DEFAULT_SHARED_BAND[spec.relative_norm]
    return float(band[0]), float(band[1])


@dataclass(frozen=True)
class EvalExperiment(TrainExperiment):
    """The experiment file through `[eval]`."""

    eval: EvalSpec | None = None
    saebench: SaeBenchSpec | None = None  # [saebench]: SAEBench-class evaluations (mdiff saebench)


def check_eval_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    """`[eval]` names dictionaries of `[train]`; its out_dir is made absolute."""
    if values.get("eval") is not None:
        ev = values["eval"]
        names = [d.name for d in values["train"].dictionaries] if values.get("train") else []
        if not values.get("train"):
            problem(errors, join_key(where, "eval"), "needs a [train] section",
                    "add [train] with the dictionaries to evaluate")
        for i, n in enumerate(ev.dictionaries):
            if names and n not in names:
                problem(errors, f"{join_key(where, 'eval.dictionaries')}[{i}]",
                        f"{show(n)} is not a [[train.dictionaries]] name", f"use one of {', '.join(map(show, names))}")
        models = [m.name for m in values.get("models") or []]
        if ev.latent_scaling is not None:
            check_scaling_models(ev.latent_scaling, models, join_key(where, "eval.latent_scaling"), errors)
        if ev.diff_lens is not None:
            ev = dataclasses.replace(ev, diff_lens=check_lens_models(
                ev.diff_lens, models, join_key(where, "eval.diff_lens"), errors, base_dir=base_dir))
        if ev.out_dir is not None:
            ev = dataclasses.replace(ev, out_dir=absolute_path(ev.out_dir, base_dir))
        values["eval"] = ev
    saebench_config.check_saebench_experiment(values, where, errors, base_dir=base_dir)


def rules() -> dict[type, Check]:
    return {EvalSpec: _check_eval, TokenClassSpec: _check_token_class, **analysis_rules(), **saebench_config.rules(),
            **browser_rules()}


def _check_eval(values: dict, where: str, errors: list[str]) -> None:
    for key, minimum, why in [("n_sequences", 1, "validation sequences to splice; use e.g. 256"),
                              ("scan_rows", 1, "validation tokens the store analyses read; use e.g. 262144"),
                              ("batch_size", 1, "sequences per forward pass"),
                              ("top_latents", 1, "latents listed in the page and CSV"),
                              ("contexts_per_latent", 1, "snippets per latent"),
                              ("context_tokens", 0, "tokens of context each side")]:
        check_size(values, key, where, errors, minimum, why)
    lo, hi = values.get("specific_below"), values.get("specific_above")
    if lo is not None and hi is not None and not 0 <= lo < hi <= 1:
        problem(errors, join_key(where, "specific_below"), f"{lo} and specific_above {hi}",
                "need 0 <= specific_below < specific_above <= 1 (relative decoder norms lie in [0, 1])")
    band = values.get("shared_band")
    if band is not None and not (len(band) == 2 and 0 <= band[0] < band[1] <= 1):
        problem(errors, join_key(where, "shared_band"), f"is {band}", "give [low, high] with 0 <= low < high <= 1")
    elif band is not None and lo is not None and hi is not None and not lo <= band[0] < band[1] <= hi:
        problem(errors, join_key(where, "shared_band"), f"{band} overlaps the specific ranges (below {lo}, "
                f"above {hi})", "keep specific_below <= low < high <= specific_above")


def _check_token_class(values: dict, where: str, errors: list[str]) -> None:
    if "name" in values:
        check_name(values["name"], join_key(where, "name"), errors, "token class")
    if values.get("kind") in ("tokens", "regex") and not values.get("values"):
        problem(errors, join_key(where, "values"), f"is empty for kind {show(values['kind'])}",
                "list the token strings (kind tokens) or one regex (kind regex)")
    if values.get("kind") == "regex":
        for i, v in enumerate(values.get("values") or []):
            try:
                re.compile(v)
            except re.error as e:
                problem(errors, f"{join_key(where, 'values')}[{i}]", f"is not a valid regex ({e})",
                        "fix the pattern (Python re syntax)")
