"""The `[train]` section: the sweep of dictionaries trained in lockstep, and how they are trained.

Which architectures exist and which keys apply to each come from the registry
(trainer/architectures.py), never from names spelled here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import CacheExperiment
from pipeline.config_checks import absolute_path, check_name, check_size
from pipeline.typed_config import Check, join_key, problem, show
from trainer import architectures as A

Architecture = Literal[tuple(A.ARCHITECTURES)]  # the registry's names


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary of a (lockstep) sweep. With one model it is an SAE, with several a crosscoder."""

    name: str
    architecture: Architecture
    n_latents: int = 4096
    k: int | None = None  # topk / batchtopk: active latents per token (batchtopk: on average)
    k_start: int | None = None  # k schedule: start here and move linearly to k ...
    k_schedule_steps: int = 0  # ... over this many steps (0: k from the start)
    k_schedule_delay: int = 0  # steps to hold k_start before the move begins
    l1_coefficient: float = 1.0  # relu: weight of the decoder-norm-weighted L1 penalty
    l1_warmup_steps: int = 0  # relu: L1 coefficient rises linearly from 0 over these steps
    l0_coefficient: float = 1.0  # jumprelu: weight of the L0 penalty
    jumprelu_bandwidth: float = 0.001  # jumprelu: width of the straight-through kernel
    jumprelu_threshold_init: float = 0.001
    aux_k: int | None = None  # topk / batchtopk: dead latents used by AuxK per token; default d_model // 2
    # (Gao et al.; capped at the number of dead latents), 0 = off
    aux_coefficient: float = 1 / 32
    decoder_init_norm: float = 0.1  # initial L2 norm of each latent's decoder vector (per model)
    resample_dead_every: int = 0  # relu: resample dead latents every this many steps (0: never)
    # relu: training-split tokens whose loss is computed to pick the resampled latents' inputs
    # (capped at the split); 2^18 costs a forward pass over 64 batches of 4096, under 1.5% of the
    # tokens trained between resamples every 5000 such steps, and is 16x the most dead latents of
    # a 16384-latent dictionary, so sampling without replacement still follows the losses
    resample_sample_tokens: int = 262_144
    lr: float | None = None  # default: train.lr
    seed: int = 0


@dataclass(frozen=True)
class TrainSpec:
    dictionaries: list[DictionarySpec]
    hook: str | None = None  # e.g. "layer8.resid_post"; default: the first [[hooks]] entry
    models: list[str] = field(default_factory=list)  # default: all models; one model -> SAE
    batch_size: int = 4096  # tokens per step (each token: one row per model)
    steps: int = 10_000
    lr: float = 5e-5
    lr_warmup_steps: int = 500
    lr_decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    grad_clip: float = 1.0
    dead_after_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    log_every: int = 50
    eval_every: int = 1000  # validation metrics every this many steps (and at the end)
    eval_batches: int = 4
    checkpoint_every: int = 1000
    seed: int = 0  # data order
    buffer_tokens: int = 262_144  # loader shuffle window, in tokens (memory: 2 windows)
    read_threads: int = 4
    reader: Literal["auto", "mmap", "zarr"] = "auto"
    # O_DIRECT reads: "auto" reads through the page cache only when the split fits in half of the
    # free memory and the run reads it at least twice (trainer/readers.py `direct_rule`)
    direct_io: Literal["auto", "always", "never"] = "auto"
    include_first_position: bool = False  # position 0 is an outlier (attention sink); skip it
    device: str = "auto"
    out_dir: str | None = None  # default: runs/<experiment name>, relative to the config file
    wandb_project: str | None = None  # log to wandb too, when it is installed


@dataclass(frozen=True)
class TrainExperiment(CacheExperiment):
    """Stage one's part of the experiment file plus `[train]`."""

    train: TrainSpec | None = None


def check_train_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    """`[train]` against the rest of the file; its out_dir made absolute (default runs/<name>)."""
    if values.get("train") is not None:
        _check_train_against_experiment(values["train"], values, join_key(where, "train"), errors)
        if values["train"].out_dir is None and values.get("name"):
            values["train"] = dataclasses.replace(
                values["train"], out_dir=absolute_path(f"runs/{values['name']}", base_dir))
        elif values["train"].out_dir is not None:
            values["train"] = dataclasses.replace(
                values["train"], out_dir=absolute_path(values["train"].out_dir, base_dir))


def rules() -> dict[type, Check]:
    return {TrainSpec: _check_train, DictionarySpec: _check_dictionary}


# what else lives in train.out_dir beside one folder per dictionary
_RESERVED_OUTPUTS = ("checkpoints", "eval", "metrics.jsonl", "report")


def _check_dictionary(values: dict, where: str, errors: list[str]) -> None:
    if "name" in values:
        check_name(values["name"], join_key(where, "name"), errors, "dictionary")
    check_size(values, "n_latents", where, errors, 1, "the dictionary size; use e.g. 16384")
    arch = values.get("architecture")
    cls = A.ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    uses_k = A.names(uses_k=True)
    if cls is not None and cls.uses_k:
        if values.get("k") is None:
            problem(errors, join_key(where, "k"), f"is required for architecture {show(arch)}",
                    "set k, the active latents per token, e.g. k = 32")
        else:
            check_size(values, "k", where, errors, 1, "active latents per token; use e.g. 32")
            n = values.get("n_latents")
            if n is not None and values["k"] > n:
                problem(errors, join_key(where, "k"), f"{values['k']} exceeds n_latents ({n})",
                        "k must be at most n_latents")
        if values.get("k_start") is not None:
            check_size(values, "k_start", where, errors, 1, "the k schedule's first k; use e.g. 2*k")
        if values.get("aux_k") is not None:
            check_size(values, "aux_k", where, errors, 0, "dead latents used by AuxK; 0 turns it off")
    else:
        for key in ("k", "k_start", "aux_k"):
            if values.get(key) is not None:
                problem(errors, join_key(where, key), f"is only used by {A.spoken(uses_k)}, not {show(arch)}",
                        "remove it")
    if values.get("resample_dead_every") and not (cls is not None and cls.resamples_dead):
        problem(errors, join_key(where, "resample_dead_every"),
                f"is only used by {A.spoken(A.names(resamples_dead=True))}, not {show(arch)}",
                f"remove it ({A.spoken(uses_k)} revive dead latents with AuxK)")
    for key in ("k_schedule_steps", "k_schedule_delay", "l1_warmup_steps", "resample_dead_every", "seed"):
        check_size(values, key, where, errors, 0, "a count of steps")
    check_size(values, "resample_sample_tokens", where, errors, 1,
               "tokens whose loss picks the resampled latents' inputs; use e.g. 262144")
    for key in ("l1_coefficient", "l0_coefficient", "aux_coefficient"):
        if values.get(key) is not None and values[key] < 0:
            problem(errors, join_key(where, key), f"is negative ({values[key]})", "use a value >= 0")
    for key in ("jumprelu_bandwidth", "jumprelu_threshold_init", "decoder_init_norm", "lr"):
        if values.get(key) is not None and values[key] <= 0:
            problem(errors, join_key(where, key), f"must be positive, got {values[key]}",
                    "use a positive number")


def _check_train(values: dict, where: str, errors: list[str]) -> None:
    for key, minimum, why in [("batch_size", 1, "tokens per step; use e.g. 4096"),
                              ("steps", 1, "training steps"),
                              ("lr_warmup_steps", 0, "a count of steps"),
                              ("dead_after_tokens", 1, "tokens without firing before a latent counts as dead"),
                              ("log_every", 1, "steps between metric lines"),
                              ("eval_every", 1, "steps between validation passes"),
                              ("eval_batches", 1, "validation batches per evaluation"),
                              ("checkpoint_every", 1, "steps between checkpoints"),
                              ("seed", 0, "the data-order seed"),
                              ("buffer_tokens", 1, "tokens in the loader's shuffle window; use e.g. 262144"),
                              ("read_threads", 1, "background reader threads; use e.g. 4")]:
        check_size(values, key, where, errors, minimum, why)
    if values.get("lr") is not None and values["lr"] <= 0:
        problem(errors, join_key(where, "lr"), f"must be positive, got {values['lr']}", "use e.g. 5e-5")
    if "lr_decay_fraction" in values and not 0 <= values["lr_decay_fraction"] <= 1:
        problem(errors, join_key(where, "lr_decay_fraction"), f"is {values['lr_decay_fraction']}",
                "use a fraction of the steps between 0 and 1")
    if "grad_clip" in values and values["grad_clip"] < 0:
        problem(errors, join_key(where, "grad_clip"), f"is negative ({values['grad_clip']})",
                "use a positive norm, or 0 to turn clipping off")
    dicts = values.get("dictionaries")
    if dicts is not None:
        if not dicts:
            problem(errors, join_key(where, "dictionaries"), "is empty",
                    "add at least one [[train.dictionaries]] entry")
        names = [d.name for d in dicts]
        for n in sorted({n for n in names if names.count(n) > 1}):
            problem(errors, join_key(where, "dictionaries"), f"name {show(n)} is used twice",
                    "give every dictionary of the sweep its own name")
        for i, n in enumerate(names):
            if n in _RESERVED_OUTPUTS:
                problem(errors, f"{join_key(where, 'dictionaries')}[{i}].name",
                        f"{show(n)} is the name of another output in train.out_dir",
                        f"rename the dictionary (not one of {', '.join(map(show, _RESERVED_OUTPUTS))})")


def _check_train_against_experiment(train: TrainSpec, values: dict, where: str,
                                    errors: list[str]) -> None:
    hooks = [h.label for h in values.get("hooks") or []]
    if train.hook is not None and hooks and train.hook not in hooks:
        problem(errors, join_key(where, "hook"), f"{show(train.hook)} is not one of the [[hooks]]",
                f"use one of {', '.join(map(show, hooks))}")
    model_names = [m.name for m in values.get("models") or []]
    for i, name in enumerate(train.models):
        if model_names and name not in model_names:
            problem(errors, f"{join_key(where, 'models')}[{i}]", f"{show(name)} is not a model of the experiment",
                    f"use one of {', '.join(map(show, model_names))}")
    n_models = len(train.models or model_names)
    if n_models >= 2:
        crosscoders = A.names(crosscoders=True)
        for i, d in enumerate(train.dictionaries):
            if d.architecture not in crosscoders:
                problem(errors, f"{join_key(where, 'dictionaries')}[{i}].architecture",
                        f"{show(d.architecture)} is not available for crosscoders ({n_models} models)",
                        f"use one of {', '.join(map(show, crosscoders))}, or train.models = "
                        "[one model] for an SAE")
