"""The `[saebench]` section: SAEBench's core, absorption and sparse-probing evaluations, offline.

Defaults are SAEBench's where it has one (prompt, ICL examples, thresholds, k values, context
length); what SAEBench downloads is replaced by local data: the absorption words come from the
model's own vocabulary, the probing texts from local files (Debian's `fortunes`, plain-text
files per class, or a CSV/JSONL table with text,label columns). A dataset whose files are absent
is skipped at run time with a message, so the section is valid on machines without them.

    [saebench]
    dictionaries = ["topk-k20", "topk-k40"]     # default: every [[train.dictionaries]] SAE
    [saebench.absorption]
    words = 4000                                # a seeded sample of the vocabulary (0: all)
    [[saebench.probing.datasets]]
    name = "bible-austen"
    kind = "texts"
    files = { bible = "corpora/kjv.txt", austen = "corpora/austen.txt" }
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.config_checks import absolute_path, check_name, check_size
from pipeline.typed_config import Check, join_key, problem, show

FORTUNES_DIR = "/usr/share/games/fortunes"  # Debian's `fortunes` and `fortunes-min` packages
FORTUNE_CLASSES = ("computers", "politics", "science", "literature", "food")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


class SaeBenchError(ValueError):
    """A study that cannot run as configured (e.g. a tokenizer without enough words); the message
    says what to change."""


@dataclass(frozen=True)
class ProbeDataset:
    """One labeled text collection; each class gives a one-vs-rest task (two classes: one task)."""

    name: str
    kind: Literal["fortunes", "texts", "table"]
    path: str | None = None  # fortunes: the directory (default Debian's); table: a .csv or .jsonl file
    classes: list[str] = field(default_factory=list)  # fortunes: category files; table: labels kept (all)
    files: dict[str, str] = field(default_factory=dict)  # texts: label -> plain-text file
    passage_words: int = 96  # texts: paragraphs (blank-line separated) cut to at most this many words


@dataclass(frozen=True)
class AbsorptionSpec:
    """First-letter absorption (SAEBench `evals/absorption`, Chanin et al.)."""

    enabled: bool = True
    prompt_template: str = "{word} has the first letter:"
    icl_examples: int = 10  # "<word> has the first letter: <L>" examples before each prompt
    words: int = 0  # alphabetic whole-word tokens used; 0: all of them, else a seeded sample
    test_fraction: float = 0.2  # held-out words: probe F1, k-sparse F1 and absorption are measured there
    max_k: int = 10  # main latents: k grows up to this ...
    f1_jump: float = 0.03  # ... while the k-sparse probe's F1 rises by more than this
    min_probe_f1: float = 0.6  # letters whose ground-truth probe F1 is at most this are not scored
    min_letters: int = 20  # fewer scorable letters than this: no absorption score (the model lacks the feature)
    batch_size: int = 32  # prompts per forward pass
    probe_l2: float = 1e-4  # ground-truth probe: weight decay on the mean loss (SAEBench's)
    ksparse_l1: float = 0.01  # latent-ranking probe: L1 on its weights (SAEBench's)
    ksparse_epochs: int = 50


@dataclass(frozen=True)
class ProbingSpec:
    """Sparse probing on mean-pooled activations (SAEBench `evals/sparse_probing`)."""

    enabled: bool = True
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    context_length: int = 128  # tokens per text (longer texts are cut)
    train_per_class: int = 800  # at most this many training texts per class ...
    test_per_class: int = 200  # ... and test texts
    test_fraction: float = 0.2  # of each class's texts held out for testing (then capped)
    batch_size: int = 16  # texts per forward pass
    datasets: list[ProbeDataset] = field(default_factory=lambda: [ProbeDataset("fortunes", "fortunes")])


@dataclass(frozen=True)
class SaeBenchSpec:
    dictionaries: list[str] = field(default_factory=list)  # names from [train]; default: all
    out_dir: str | None = None  # default: <eval dir>/saebench
    device: str = "auto"
    seed: int = 42
    absorption: AbsorptionSpec = field(default_factory=AbsorptionSpec)
    probing: ProbingSpec = field(default_factory=ProbingSpec)


def check_saebench_experiment(values: dict, where: str, errors: list[str], *, base_dir: str) -> None:
    """`[saebench]` against `[train]`; its out_dir and dataset paths made absolute."""
    spec = values.get("saebench")
    if spec is None:
        return
    key = join_key(where, "saebench")
    train = values.get("train")
    if train is None:
        problem(errors, key, "needs a [train] section", "add [train] with the dictionaries to evaluate")
    else:
        names = [d.name for d in train.dictionaries]
        for i, n in enumerate(spec.dictionaries):
            if n not in names:
                problem(errors, f"{join_key(key, 'dictionaries')}[{i}]", f"{show(n)} is not a "
                        "[[train.dictionaries]] name", f"use one of {', '.join(map(show, names))}")
    values["saebench"] = absolute_paths(spec, base_dir)


def absolute_paths(spec: SaeBenchSpec, base_dir: str) -> SaeBenchSpec:
    """Relative paths in the section are relative to the config file, like every path in it."""
    datasets = [dataclasses.replace(d, path=None if d.path is None else absolute_path(d.path, base_dir),
                                    files={k: absolute_path(v, base_dir) for k, v in d.files.items()})
                for d in spec.probing.datasets]
    return dataclasses.replace(
        spec, out_dir=None if spec.out_dir is None else absolute_path(spec.out_dir, base_dir),
        probing=dataclasses.replace(spec.probing, datasets=datasets))


def rules() -> dict[type, Check]:
    return {SaeBenchSpec: _check_spec, AbsorptionSpec: _check_absorption, ProbingSpec: _check_probing,
            ProbeDataset: _check_dataset}


def _check_spec(values: dict, where: str, errors: list[str]) -> None:
    check_size(values, "seed", where, errors, 0, "any non-negative integer")


def _check_fraction(values: dict, key: str, where: str, errors: list[str], lo: float, hi: float,
                    closed: bool, why: str) -> None:
    v = values.get(key)
    if v is not None and not (lo <= v <= hi if closed else lo < v < hi):
        bounds = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
        problem(errors, join_key(where, key), f"is {v}", f"give a number in {bounds}: {why}")


def _check_absorption(values: dict, where: str, errors: list[str]) -> None:
    template = values.get("prompt_template")
    if template is not None:
        try:
            ok = "{word}" in template and template.format(word="x") is not None
        except (KeyError, ValueError, IndexError):
            ok = False
        if not ok:
            problem(errors, join_key(where, "prompt_template"), f"{show(template)} is not a template of "
                    "{word}", "write the word as {word} and double any other brace, e.g. "
                    "\"{word} has the first letter:\"")
    for key, minimum, why in [("icl_examples", 0, "examples before each prompt; SAEBench uses 10"),
                              ("words", 0, "0 for every word, else how many to sample"),
                              ("max_k", 1, "the largest k of the k-sparse probes; SAEBench uses 10"),
                              ("min_letters", 1, "letters needed for a score; SAEBench uses 20"),
                              ("batch_size", 1, "prompts per forward pass"),
                              ("ksparse_epochs", 1, "epochs of the latent-ranking probe; SAEBench uses 50")]:
        check_size(values, key, where, errors, minimum, why)
    if values.get("min_letters", 0) > len(LETTERS):
        problem(errors, join_key(where, "min_letters"), f"is {values['min_letters']}",
                f"there are {len(LETTERS)} letters")
    _check_fraction(values, "test_fraction", where, errors, 0, 1, False, "the held-out share of the words")
    _check_fraction(values, "min_probe_f1", where, errors, 0, 1, True, "an F1 score")
    for key in ("f1_jump", "probe_l2", "ksparse_l1"):
        if values.get(key) is not None and values[key] < 0:
            problem(errors, join_key(where, key), f"is negative ({values[key]})", "give a number >= 0")


def _check_probing(values: dict, where: str, errors: list[str]) -> None:
    ks = values.get("ks")
    if ks is not None:
        if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
            problem(errors, join_key(where, "ks"), f"is {ks}", "list distinct k >= 1, e.g. [1, 2, 5, 10, 20, 50]")
    for key, minimum, why in [("context_length", 2, "tokens per text, position 0 included; SAEBench uses 128"),
                              ("train_per_class", 1, "training texts per class"),
                              ("test_per_class", 1, "test texts per class"),
                              ("batch_size", 1, "texts per forward pass")]:
        check_size(values, key, where, errors, minimum, why)
    _check_fraction(values, "test_fraction", where, errors, 0, 1, False, "the held-out share of each class")
    names = [d.name for d in values.get("datasets") or []]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problem(errors, join_key(where, "datasets"), f"name {show(name)} is used twice",
                "give each dataset its own name: it labels the result files")


def _check_dataset(values: dict, where: str, errors: list[str]) -> None:
    if "name" in values:
        check_name(values["name"], join_key(where, "name"), errors, "dataset")
    check_size(values, "passage_words", where, errors, 1, "words per passage")
    kind = values.get("kind")
    files, path, classes = values.get("files") or {}, values.get("path"), values.get("classes") or []
    if kind == "texts":
        if len(files) < 2:
            problem(errors, join_key(where, "files"), f"names {len(files)} class(es)",
                    "give label = \"file\" pairs for two classes or more")
        if path is not None or classes:
            problem(errors, where, "kind \"texts\" takes its classes from files",
                    "remove path and classes; list label = \"file\" pairs under files")
    elif kind in ("fortunes", "table"):
        if files:
            problem(errors, join_key(where, "files"), f"is set for kind {show(kind)}",
                    "remove it: files is for kind \"texts\"")
        if kind == "table" and path is None:
            problem(errors, join_key(where, "path"), "is missing for kind \"table\"",
                    "give a .csv (header text,label) or .jsonl ({\"text\": ..., \"label\": ...}) file")
        if kind == "table" and path is not None and not path.lower().endswith((".csv", ".jsonl")):
            problem(errors, join_key(where, "path"), f"{show(path)} is neither .csv nor .jsonl",
                    "give a .csv (header text,label) or .jsonl file")
        if len(classes) == 1:
            problem(errors, join_key(where, "classes"), f"names one class ({show(classes[0])})",
                    "name two classes or more (or none, for all of them)")
