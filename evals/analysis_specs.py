"""Config sections of the two fine-tuning analyses: Latent Scaling and the activation-difference lens.

Kept apart from the analyses themselves so that `evals.config` can hold them as `[eval]` subsections
without importing torch code (and without an import cycle through `evals.activations`). Each is a
frozen dataclass validated by `pipeline.typed_config` (unknown keys rejected); `rules()` lists the
checks that type hints cannot say, and the two `check_*_models` helpers check model names against
the experiment, for `evals.config.check_eval_experiment` to call.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from pipeline.config_checks import absolute_path, check_size
from pipeline.typed_config import Check, join_key, problem, show


@dataclass(frozen=True)
class LatentScalingSpec:
    """Latent Scaling (Minder et al. 2025) of a crosscoder: is a latent that looks specific to the
    fine-tuned model really absent from the base model?"""

    base: str | None = None  # model in the base role; default the dictionary's first (two models)
    ft: str | None = None  # model in the fine-tuned role; default the second (two models)
    # with more than two models, an unset role takes every model: all ordered pairs (base, ft)
    max_rows: int = 262_144  # validation rows (tokens) scanned; the whole split when it is smaller
    batch_rows: int | None = None  # rows per step; default from n_latents (batch x latents <= 2^24)
    exclusive_delta: float = 0.9  # Minder's Delta at least this: exclusive to the fine-tuned model
    shared_delta: list[float] = field(default_factory=lambda: [0.4, 0.6])  # Delta in this band: shared
    nu_epsilon_max: float = 0.2  # genuine needs nu_epsilon below this (else: complete shrinkage)
    nu_r_max: float = 0.5  # genuine needs nu_r below this (else: latent decoupling)
    min_active_tokens: int = 1  # exclusive latents firing on fewer scanned tokens are "inactive"
    device: str = "auto"


@dataclass(frozen=True)
class DiffLensSpec:
    """The activation-difference lens (Minder et al. 2025): the mean of h_ft - h_base over the first
    positions of text unrelated to the fine-tune, read through the logit lens."""

    base: str | None = None  # default the experiment's first model
    ft: str | None = None  # default its second
    layer: int = -1  # decoder layer whose output (resid_post) is read; negative from the end: -1 = last
    n_positions: int = 5  # positions 0 .. n_positions-1 of each sequence are run and averaged
    include_first_position: bool = False  # position 0 (BOS, attention sink) has massive activations
    n_sequences: int = 256
    batch_size: int = 32  # sequences per forward pass
    top_tokens: int = 20  # tokens listed, promoted and suppressed, overall and per position
    readers: list[str] = field(default_factory=list)  # whose final norm + unembedding; default ft, base
    text_paths: list[str] = field(default_factory=list)  # plain-text files; empty: the token set's
    #                                                      validation sequences
    prepend_bos: bool = True  # windows of text_paths start with the tokenizer's BOS, as token sets do
    device: str = "auto"


def rules() -> dict[type, Check]:
    return {LatentScalingSpec: _check_scaling, DiffLensSpec: _check_lens}


def _check_roles(values: dict, where: str, errors: list[str]) -> None:
    if values.get("base") is not None and values.get("base") == values.get("ft"):
        problem(errors, join_key(where, "ft"), f"is {show(values['ft'])}, the same model as base",
                "give two different model names (base and fine-tuned)")


def _check_scaling(values: dict, where: str, errors: list[str]) -> None:
    _check_roles(values, where, errors)
    check_size(values, "max_rows", where, errors, 1, "validation rows to scan; use e.g. 262144")
    check_size(values, "min_active_tokens", where, errors, 1, "use 1 (every latent that fires at all)")
    if values.get("batch_rows") is not None:
        check_size(values, "batch_rows", where, errors, 1, "rows per step, or leave it out (automatic)")
    delta = values.get("exclusive_delta")
    if delta is not None and not 0.5 < delta <= 1:
        problem(errors, join_key(where, "exclusive_delta"), f"is {delta}",
                "need 0.5 < exclusive_delta <= 1 (Delta lies in [0, 1], 0.5 = equal norms; the paper uses 0.9)")
    band = values.get("shared_delta")
    if band is not None and not (len(band) == 2 and 0 <= band[0] <= 0.5 <= band[1] <= 1):
        problem(errors, join_key(where, "shared_delta"), f"is {band}",
                "give [low, high] with 0 <= low <= 0.5 <= high <= 1 (the paper uses [0.4, 0.6])")
    for key in ("nu_epsilon_max", "nu_r_max"):
        if key in values and not values[key] > 0:
            problem(errors, join_key(where, key), f"is {values[key]}",
                    "give a positive ratio (the paper uses 0.2 for nu_epsilon and 0.5 for nu_r)")


def _check_lens(values: dict, where: str, errors: list[str]) -> None:
    _check_roles(values, where, errors)
    for key, minimum, why in [("n_sequences", 1, "sequences to average over; use e.g. 256"),
                              ("batch_size", 1, "sequences per forward pass"),
                              ("top_tokens", 1, "tokens listed; use e.g. 20")]:
        check_size(values, key, where, errors, minimum, why)
    first = 0 if values.get("include_first_position") else 1
    if "n_positions" in values and values["n_positions"] <= first:
        problem(errors, join_key(where, "n_positions"), f"is {values['n_positions']}, which leaves no position"
                + ("" if first == 0 else " once position 0 is excluded"),
                f"give at least {first + 1} (e.g. 5: positions {first}..4)")
    readers = values.get("readers") or []
    if len(set(readers)) != len(readers):
        problem(errors, join_key(where, "readers"), f"lists a model twice ({show(readers)})", "list each once")


def check_scaling_models(spec: LatentScalingSpec, models: list[str], where: str, errors: list[str]) -> None:
    """The roles name experiment models (the dictionary's own models are checked when it is opened)."""
    _check_names(spec, ("base", "ft"), models, where, errors)


def check_lens_models(spec: DiffLensSpec, models: list[str], where: str, errors: list[str], *,
                      base_dir: str) -> DiffLensSpec:
    """Roles and readers name experiment models, text files exist; returns the spec with the
    paths made absolute (relative to the config file)."""
    _check_names(spec, ("base", "ft"), models, where, errors)
    for i, r in enumerate(spec.readers):
        if r not in models:
            problem(errors, f"{join_key(where, 'readers')}[{i}]", f"{show(r)} is not a [[models]] name",
                    f"use one of {', '.join(map(show, models))}")
    if spec.base is None and spec.ft is None and len(models) < 2:
        problem(errors, where, "needs two models", "define two [[models]] (base and fine-tuned)")
    paths = [absolute_path(p, base_dir) for p in spec.text_paths]
    for i, p in enumerate(paths):
        if not os.path.isfile(p):
            problem(errors, f"{join_key(where, 'text_paths')}[{i}]", f"{p} is not a file",
                    "give plain-text files of text unrelated to the fine-tune")
    return dataclasses.replace(spec, text_paths=paths)


def _check_names(spec, keys, models: list[str], where: str, errors: list[str]) -> None:
    for key in keys:
        name = getattr(spec, key)
        if name is not None and name not in models:
            problem(errors, join_key(where, key), f"{show(name)} is not a [[models]] name",
                    f"use one of {', '.join(map(show, models))}")
