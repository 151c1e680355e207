"""The experiment file, composed: stage one's sections, `[train]` and `[eval]`, each checked by its stage.

It is validated completely before any work starts, so a typo found after an hour of forward
passes is impossible: unknown keys, wrong types, bad values and missing files are all reported at
once, each naming the key, the file and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from evals import config as eval_config
from evals.config import EvalExperiment
from pipeline import input_checks as cache_config
from pipeline.config_checks import ADVICE
from pipeline.config_files import dump_config, read_config_file, write_config
from pipeline.typed_config import ConfigError, Rules, from_mapping
from trainer import config as train_config

__all__ = ["ConfigError", "ExperimentConfig", "dump_config", "load_config", "parse_config", "write_config"]


@dataclass(frozen=True)
class ExperimentConfig(EvalExperiment):
    """One experiment file: every stage's sections."""


def _check_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    cache_config.check_cache_experiment(values, where, errors, base_dir=base_dir)
    eval_config.check_eval_experiment(values, where, errors, base_dir=base_dir)
    train_config.check_train_experiment(values, where, errors, base_dir=base_dir)


def experiment_rules(base_dir: str) -> Rules:
    checks = {**cache_config.rules(base_dir), **train_config.rules(), **eval_config.rules()}
    checks[ExperimentConfig] = lambda values, where, errors: _check_experiment(values, where, errors,
                                                                               base_dir=base_dir)
    return Rules(checks=checks, advice=ADVICE)


def parse_config(mapping: Any, source: str = "<config>", base_dir: str | os.PathLike | None = None
                 ) -> ExperimentConfig:
    """Validate already-parsed data completely, raising one ConfigError that lists every problem.

    Relative paths are resolved against `base_dir` (default: the working directory).
    """
    base = os.path.abspath(os.fspath(base_dir) if base_dir is not None else os.getcwd())
    errors: list[str] = []
    if mapping is None:
        raise ConfigError(source, ["the config is empty (it needs name, store, models, hooks and tokens)"])
    cfg = from_mapping(ExperimentConfig, mapping, "", errors, experiment_rules(base))
    if errors or cfg is None:
        raise ConfigError(source, errors or ["(top level): the config is invalid"])
    return cfg


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read and validate a .toml or .yaml experiment file; paths in it are relative to the file."""
    source = os.fspath(path)
    data = read_config_file(source)
    full = os.path.abspath(source)
    cfg = parse_config(data, source, base_dir=os.path.dirname(full))
    return dataclasses.replace(cfg, source_file=full)
