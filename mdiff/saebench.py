"""`mdiff saebench CONFIG`: the SAEBench-class study (evals/saebench/study.py) of an experiment's
dictionaries, with its settings from the config's `[saebench]` section (evals/saebench/config.py;
all defaults when the section is absent).

The section is read here whether or not the experiment config class knows it yet: when it does
(`ExperimentConfig.saebench`), the config is loaded as usual; otherwise the section is taken out,
the rest loaded as an experiment, and the section validated with the same rules, every problem of
both reported at once.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from evals.saebench import config as SB
from mdiff.config import ExperimentConfig, load_config, parse_config
from pipeline.config_checks import ADVICE
from pipeline.config_files import read_config_file
from pipeline.typed_config import ConfigError, Rules, from_mapping


def load_study(path: str | os.PathLike) -> tuple[ExperimentConfig, SB.SaeBenchSpec]:
    """The experiment and its `[saebench]` settings, both validated."""
    source = os.fspath(path)
    if any(f.name == "saebench" for f in dataclasses.fields(ExperimentConfig)):
        cfg = load_config(source)
        return cfg, getattr(cfg, "saebench", None) or SB.SaeBenchSpec()
    data = read_config_file(source)
    section = data.pop("saebench", None) if isinstance(data, dict) else None
    base = os.path.dirname(os.path.abspath(source))
    errors: list[str] = []
    try:
        cfg = dataclasses.replace(parse_config(data, source, base_dir=base), source_file=os.path.abspath(source))
    except ConfigError as e:
        errors += e.problems
        cfg = None
    spec = SB.SaeBenchSpec()
    if section is not None:
        spec = from_mapping(SB.SaeBenchSpec, section, "saebench", errors, Rules(checks=SB.rules(), advice=ADVICE))
    if spec is not None and cfg is not None:
        values = {"saebench": spec, "train": cfg.train}
        SB.check_saebench_experiment(values, "", errors, base_dir=base)
        spec = values["saebench"]
    if errors or cfg is None or spec is None:
        raise ConfigError(source, errors or ["saebench: the section is invalid"])
    return cfg, spec


def main(args) -> int:
    """The subcommand: run the study, print the comparison table. Returns the exit status."""
    from evals.saebench.study import run_study

    cfg, spec = load_study(args.config)
    if getattr(args, "dictionary", None):
        known = [d.name for d in cfg.train.dictionaries] if cfg.train else []
        unknown = [n for n in args.dictionary if n not in known]
        if unknown:
            print(f"error: {unknown} not in [[train.dictionaries]] of {args.config}", file=sys.stderr)
            return 2
        spec = dataclasses.replace(spec, dictionaries=list(args.dictionary))
    if getattr(args, "skip_absorption", False):
        spec = dataclasses.replace(spec, absorption=dataclasses.replace(spec.absorption, enabled=False))
    if getattr(args, "skip_probing", False):
        spec = dataclasses.replace(spec, probing=dataclasses.replace(spec.probing, enabled=False))
    try:
        result = run_study(cfg, spec, progress=not getattr(args, "no_progress", False))
    except SB.SaeBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.table)
    for name, path in result.figures.items():
        print(f"{name}: {path}")
    return 0


def add_parser(sub) -> None:
    """The `saebench` subcommand on the CLI's subparsers."""
    s = sub.add_parser("saebench", help="SAEBench core, absorption and sparse probing for every SAE, offline; "
                       "a comparison table and figures (resumable)")
    s.add_argument("config", help="experiment config with [train] (and optionally [eval], [saebench])")
    s.add_argument("--dictionary", action="append", metavar="NAME",
                   help="only this [[train.dictionaries]] entry; repeatable")
    s.add_argument("--skip-absorption", action="store_true", help="no absorption evaluation")
    s.add_argument("--skip-probing", action="store_true", help="no sparse probing")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=main)
