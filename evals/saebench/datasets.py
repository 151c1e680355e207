"""Labeled texts for sparse probing, from local files: Debian's `fortunes` collection (one category
per file, entries separated by lines holding only "%"), plain-text files per class (the demo's
Bible and Austen), or a table with text and label columns (CSV with a header, or JSON lines).

A dataset whose files are absent is skipped with a message naming what to install or fix; a class
with fewer than two texts is dropped the same way, since it can give neither a training nor a
test example.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from evals.saebench.config import FORTUNE_CLASSES, FORTUNES_DIR, ProbeDataset, ProbingSpec

_OVERSTRIKE = re.compile(r".\x08")  # "_\bX" or "X\bX": old terminals' underline and bold


class DatasetUnavailable(FileNotFoundError):
    """The dataset's files are missing or hold too little to probe with; the message says why."""


@dataclass
class Split:
    """One dataset, split per class into training and test texts."""

    name: str
    train: dict[str, list[str]]
    test: dict[str, list[str]]

    @property
    def classes(self) -> list[str]:
        return list(self.train)


def parse_fortunes(text: str) -> list[str]:
    """The entries of a fortune file: blocks between lines that hold only "%", overstriking removed,
    whitespace-trimmed, empty ones dropped."""
    entries, block = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(block))
            block = []
        else:
            block.append(_OVERSTRIKE.sub("", line))
    entries.append("\n".join(block))
    return [e.strip() for e in entries if e.strip()]


def passages(text: str, max_words: int) -> list[str]:
    """Paragraphs (blank-line separated) cut into pieces of at most `max_words` words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        words = para.split()
        out += [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]
    return out


def read_table(path: Path) -> dict[str, list[str]]:
    """label -> texts of a .csv (header with text and label) or .jsonl file."""
    rows: list[dict] = []
    if path.suffix.lower() == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetUnavailable(f"{path}:{n}: not JSON ({e.msg}): write one "
                                                 "{\"text\": ..., \"label\": ...} object per line") from None
    else:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    by_label: dict[str, list[str]] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise DatasetUnavailable(f"{path}: row {n} has no text and label: give columns (CSV header) "
                                     "or keys (JSON lines) named text and label")
        if str(row["text"]).strip():
            by_label.setdefault(str(row["label"]), []).append(str(row["text"]))
    return by_label


def load_texts(ds: ProbeDataset) -> dict[str, list[str]]:
    """class -> texts of one configured dataset; DatasetUnavailable when its files are absent."""
    if ds.kind == "fortunes":
        root = Path(ds.path or FORTUNES_DIR)
        if not root.is_dir():
            raise DatasetUnavailable(f"no fortunes directory {root}: install Debian's fortunes "
                                     "(apt-get install fortunes fortunes-min) or set its path")
        out = {}
        for name in ds.classes or FORTUNE_CLASSES:
            file = root / name
            if file.is_file():
                out[name] = parse_fortunes(file.read_text(encoding="utf-8", errors="replace"))
        return out
    if ds.kind == "texts":
        missing = [str(p) for p in ds.files.values() if not Path(p).is_file()]
        if missing:
            raise DatasetUnavailable(f"missing text file(s) {', '.join(missing)}")
        return {label: passages(Path(p).read_text(encoding="utf-8", errors="replace"), ds.passage_words)
                for label, p in ds.files.items()}
    path = Path(ds.path or "")
    if not path.is_file():
        raise DatasetUnavailable(f"no table {path}")
    table = read_table(path)
    return {c: table.get(c, []) for c in ds.classes} if ds.classes else table


def split_dataset(ds: ProbeDataset, spec: ProbingSpec, seed: int, log=print) -> Split:
    """Each class's texts shuffled with the seed; test_fraction of them (at most test_per_class)
    held out, then at most train_per_class kept for training."""
    texts = load_texts(ds)
    rng = random.Random(f"{seed}:{ds.name}")
    train, test = {}, {}
    for label, items in texts.items():
        items = list(dict.fromkeys(items))  # a repeated text must not land in both splits
        if len(items) < 2:
            log(f"  {ds.name}: class {label!r} has {len(items)} text(s): dropped")
            continue
        rng.shuffle(items)
        n_test = min(spec.test_per_class, max(1, round(len(items) * spec.test_fraction)))
        test[label] = items[:n_test]
        train[label] = items[n_test:n_test + spec.train_per_class]
    if len(train) < 2:
        raise DatasetUnavailable(f"{ds.name}: {len(train)} class(es) with two texts or more "
                                 f"({', '.join(texts) or 'none found'}); probing needs two")
    return Split(ds.name, train, test)
