"""The probing datasets' readers on small files written here, and the split rules."""

from __future__ import annotations

import json

import pytest

from evals.saebench.config import ProbeDataset, ProbingSpec
from evals.saebench.datasets import DatasetUnavailable, parse_fortunes, passages, read_table, split_dataset

FORTUNE_FILE = """A first fortune,
on two lines.
%
%
   \t
%
B_\bo_\bl_\bd and u_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd.
\t\t-- Someone
%
Last one, no trailing percent"""


def test_fortune_entries_split_on_percent_lines_without_overstriking_or_empty_entries():
    assert parse_fortunes(FORTUNE_FILE) == [
        "A first fortune,\non two lines.",
        "Bold and underlined.\n\t\t-- Someone",
        "Last one, no trailing percent",
    ]
    assert parse_fortunes("%\n%\n") == []


def test_passages_cut_paragraphs_to_the_word_limit():
    text = "one two three four five\n\n\nsix seven\n \nlast"
    assert passages(text, 2) == ["one two", "three four", "five", "six seven", "last"]


def test_tables_read_from_csv_and_json_lines(tmp_path):
    csv_file = tmp_path / "t.csv"
    csv_file.write_text('text,label\n"hello, world",a\nbye,b\n,a\nagain,a\n', encoding="utf-8")
    assert read_table(csv_file) == {"a": ["hello, world", "again"], "b": ["bye"]}
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [{"text": "x", "label": 1}, {"text": "y", "label": 2}]) + "\n")
    assert read_table(jsonl) == {"1": ["x"], "2": ["y"]}
    jsonl.write_text('{"text": "x"}\n')
    with pytest.raises(DatasetUnavailable, match="text and label"):
        read_table(jsonl)


def fortunes_dir(tmp_path, sizes: dict[str, int]):
    d = tmp_path / "fortunes"
    d.mkdir()
    for name, n in sizes.items():
        (d / name).write_text("\n%\n".join(f"{name} entry {i}" for i in range(n)) + "\n%\n")
    return d


def test_split_holds_out_a_fraction_per_class_caps_both_sides_and_drops_tiny_classes(tmp_path):
    d = fortunes_dir(tmp_path, {"science": 50, "food": 10, "law": 1})
    spec = ProbingSpec(train_per_class=30, test_per_class=5, test_fraction=0.2)
    logged = []
    split = split_dataset(ProbeDataset("f", "fortunes", path=str(d), classes=["science", "food", "law", "nope"]),
                          spec, seed=3, log=logged.append)
    assert split.classes == ["science", "food"]
    assert {c: (len(split.train[c]), len(split.test[c])) for c in split.classes} == {"science": (30, 5),
                                                                                      "food": (8, 2)}
    for c in split.classes:
        assert not set(split.train[c]) & set(split.test[c])
        assert all(t.startswith(c) for t in split.train[c] + split.test[c])
    assert any("law" in line for line in logged)
    again = split_dataset(ProbeDataset("f", "fortunes", path=str(d), classes=["science", "food"]), spec, seed=3,
                          log=lambda _: None)
    assert again.train == split.train  # the seed decides


def test_absent_datasets_are_reported_not_crashed_on(tmp_path):
    spec = ProbingSpec()
    with pytest.raises(DatasetUnavailable, match="apt-get install fortunes"):
        split_dataset(ProbeDataset("f", "fortunes", path=str(tmp_path / "none")), spec, 0)
    with pytest.raises(DatasetUnavailable, match="missing text file"):
        split_dataset(ProbeDataset("t", "texts", files={"a": str(tmp_path / "a.txt"), "b": str(tmp_path / "b.txt")}),
                      spec, 0)
    d = fortunes_dir(tmp_path, {"science": 20})
    with pytest.raises(DatasetUnavailable, match="1 class"):
        split_dataset(ProbeDataset("f", "fortunes", path=str(d), classes=["science", "food"]), spec, 0,
                      log=lambda _: None)
