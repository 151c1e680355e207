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
    # crosscoders: latents [0, shared_latents) share one decoder vector across models (tied), then
    # dedicated_latents[i] latents (one count per model, train.models order) decode into model i
    # only; the rest are free (trainer/latent_partition.py)
    shared_latents: int = 0
    dedicated_latents: list[int] = field(default_factory=list)  # [] = none
    shared_penalty_factor: float | None = None  # relu: factor on the shared latents' L1; default 0.15
    resample_dead_every: int = 0  # relu: resample dead latents every this many steps (0: never)
    # relu: training-split tokens whose loss is computed to pick the resampled latents' inputs
    # (capped at the split); 2^18 costs a forward pass over 64 batches of 4096, under 1.5% of the
    # tokens trained between resamples every 5000 such steps, and is 16x the most dead latents of
    # a 16384-latent dictionary, so sampling without replacement still follows the losses
    resample_sample_tokens: int = 262_144
    # relu: the L1 coefficient moves linearly from l1_coefficient_start to l1_coefficient over
    # l1_schedule_steps, after holding the start for l1_schedule_delay steps; l1_warmup_steps'
    # rise from 0 multiplies it (trainer/schedules.py `l1_at`)
    l1_coefficient_start: float | None = None
    l1_schedule_steps: int = 0
    l1_schedule_delay: int = 0
    # relu: adaptive sparsity: the L1 coefficient times clamp(target / smoothed training FVU, lo, hi)
    # (trainer/variants.py); a target FVU, not MSE, means the same at every hook, width and model count
    adaptive_l1_target_fvu: float | None = None
    adaptive_l1_clamp: list[float] = field(default_factory=lambda: [0.1, 10.0])  # [lo, hi], lo <= 1 <= hi
    adaptive_l1_ema_decay: float = 0.99  # the FVU's smoothing: an EMA of the batch FVU (0: the last batch)
    resample_window_steps: int = 0  # relu: resample the latents silent for this many steps (0: the dead ones)
    merge_every: int = 0  # relu: merge near-duplicate latents every this many steps (0: never) ...
    merge_threshold: float = 0.95  # ... pairs whose decoder cosine (models concatenated) exceeds this
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
    # several processes (accelerate launch / torchrun): "data" splits every batch across them,
    # "dictionaries" gives each its share of the sweep, "auto" picks (trainer/distributed.py `choose_parallel`)
    parallel: Literal["data", "dictionaries", "auto"] = "auto"
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
    _check_partition(values, where, errors, cls)
    # the training variants (trainer/variants.py): ranges, then keys that would do nothing
    for key in ("l1_schedule_steps", "l1_schedule_delay", "resample_window_steps", "merge_every"):
        check_size(values, key, where, errors, 0, "a count of steps")
    if values.get("l1_coefficient_start") is not None and values["l1_coefficient_start"] < 0:
        problem(errors, join_key(where, "l1_coefficient_start"), f"is negative ({values['l1_coefficient_start']})",
                "use a value >= 0")
    target = values.get("adaptive_l1_target_fvu")
    if target is not None and not 0 < target < 1:
        problem(errors, join_key(where, "adaptive_l1_target_fvu"), f"is {target}",
                "use the fraction of variance left unexplained to aim for, between 0 and 1, e.g. 0.1")
    clamp = values.get("adaptive_l1_clamp")
    if clamp is not None and not (len(clamp) == 2 and 0 < clamp[0] <= 1 <= clamp[1]):
        problem(errors, join_key(where, "adaptive_l1_clamp"), f"is {show(clamp)}",
                "give [lo, hi], the bounds of the factor on l1_coefficient, with 0 < lo <= 1 <= hi, e.g. [0.1, 10]")
    if "adaptive_l1_ema_decay" in values and not 0 <= values["adaptive_l1_ema_decay"] < 1:
        problem(errors, join_key(where, "adaptive_l1_ema_decay"), f"is {values['adaptive_l1_ema_decay']}",
                "use a decay in [0, 1), e.g. 0.99 (0: no smoothing)")
    if "merge_threshold" in values and not 0 < values["merge_threshold"] < 1:
        problem(errors, join_key(where, "merge_threshold"), f"is {values['merge_threshold']}",
                "use a decoder cosine between 0 and 1, e.g. 0.95")
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(DictionarySpec)}
    changed = {k for k in ("l1_coefficient_start", "l1_schedule_steps", "l1_schedule_delay",
                           "adaptive_l1_target_fvu", "adaptive_l1_clamp", "adaptive_l1_ema_decay",
                           "resample_window_steps", "merge_every", "merge_threshold")
               if k in values and values[k] != defaults[k]}
    trait = {"resample_window_steps": "resamples_dead", "merge_every": "resamples_dead",
             "merge_threshold": "resamples_dead"}
    for key in sorted(changed):
        needs = trait.get(key, "l1_penalty")
        if cls is not None and not getattr(cls, needs):
            changed.discard(key)  # one message for it is enough
            problem(errors, join_key(where, key), f"is only used by {A.spoken(A.names(**{needs: True}))}, "
                    f"not {show(arch)}", "remove it")
    for key, needs, fix in (
            ("l1_coefficient_start", ("l1_schedule_steps", "l1_schedule_delay"),
             "set l1_schedule_steps, the steps it takes to reach l1_coefficient, or remove it"),
            ("l1_schedule_steps", ("l1_coefficient_start",), "set l1_coefficient_start, where the line starts"),
            ("l1_schedule_delay", ("l1_coefficient_start",), "set l1_coefficient_start, the value held"),
            ("adaptive_l1_clamp", ("adaptive_l1_target_fvu",), "set adaptive_l1_target_fvu, or remove it"),
            ("adaptive_l1_ema_decay", ("adaptive_l1_target_fvu",), "set adaptive_l1_target_fvu, or remove it"),
            ("resample_window_steps", ("resample_dead_every",), "set resample_dead_every, how often to resample"),
            ("merge_threshold", ("merge_every",), "set merge_every, how often to merge, or remove it")):
        if key in changed and not any(n in values and values[n] != defaults[n] for n in needs):
            problem(errors, join_key(where, key), f"does nothing without {' or '.join(needs)}", fix)


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
    _check_partition_models(train, n_models, where, errors)


def _check_partition(values: dict, where: str, errors: list[str], cls) -> None:
    """Shared and dedicated latents (trainer/latent_partition.py): counts that fit, a penalty
    factor only where there is a penalty to reduce and latents to reduce it for."""
    check_size(values, "shared_latents", where, errors, 0, "a count of latents; 0 for none")
    dedicated = values.get("dedicated_latents") or []
    for i, count in enumerate(dedicated):
        if count < 0:
            problem(errors, f"{join_key(where, 'dedicated_latents')}[{i}]", f"is negative ({count})",
                    "give a count of latents >= 0 per model")
    n, shared = values.get("n_latents"), values.get("shared_latents", 0)
    if n is not None and shared >= 0 and all(c >= 0 for c in dedicated) and shared + sum(dedicated) > n:
        problem(errors, join_key(where, "dedicated_latents" if dedicated else "shared_latents"),
                f"shared_latents + sum(dedicated_latents) = {shared + sum(dedicated)} exceeds n_latents ({n})",
                "partition at most n_latents latents")
    factor = values.get("shared_penalty_factor")
    if factor is None:
        return
    key = join_key(where, "shared_penalty_factor")
    if cls is not None and not cls.l1_penalty:
        problem(errors, key, f"is only used by {A.spoken(A.names(l1_penalty=True))}, not {show(values['architecture'])}",
                "remove it: every latent selected by top-k costs one slot of k, and ranking by the sum of "
                "decoder norms already favours shared latents, so there is no penalty to reduce (shared "
                "latents are tied only)")
    elif not shared:
        problem(errors, key, "is set but shared_latents is 0", "set shared_latents, or remove it")
    if not 0 <= factor <= 1:
        problem(errors, key, f"is {factor}", "use the fraction of the L1 weight shared latents pay, "
                "between 0 and 1, e.g. 0.15")


def _check_partition_models(train: TrainSpec, n_models: int, where: str, errors: list[str]) -> None:
    """The partition against the models trained: crosscoders only, one dedicated count per model."""
    models = ", ".join(map(show, train.models)) if train.models else "the experiment's models"
    for i, d in enumerate(train.dictionaries):
        at = f"{join_key(where, 'dictionaries')}[{i}]"
        if n_models == 1 and (d.shared_latents or any(d.dedicated_latents)):
            key = "shared_latents" if d.shared_latents else "dedicated_latents"
            problem(errors, f"{at}.{key}", "partitions a crosscoder's latents across models, but this is an "
                    "SAE (one model)", "remove it, or train several models for a crosscoder")
        elif n_models >= 2 and d.dedicated_latents and len(d.dedicated_latents) != n_models:
            problem(errors, f"{at}.dedicated_latents",
                    f"has {len(d.dedicated_latents)} counts for {n_models} models",
                    f"give one count per model, in the order of train.models ({models}), e.g. "
                    f"{[256] * n_models}")
