"""The pure helpers the benchmarks compute their ratios and agreement checks with and write their
BENCHMARKS.md sections with."""

import pytest

from benchmarks.common.helpers import agreement, alternating, dir_bytes, paired_ratio, write_section


def test_paired_ratio_is_the_median_of_per_pair_ratios():
    # pair-wise ratios 2, 3, 10: the median is 3, not the ratio of medians (4 / 2) or of sums
    assert paired_ratio([2.0, 6.0, 40.0], [1.0, 2.0, 4.0]) == 3.0
    assert paired_ratio([1.0, 3.0], [1.0, 1.0]) == 2.0  # even count: mean of the middle two


def test_paired_ratio_refuses_unpaired_series():
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_ratio([], [])


def test_alternating_reverses_every_other_repeat():
    orders = list(alternating(["a", "b", "c"], 3))
    assert orders == [(0, ["a", "b", "c"]), (1, ["c", "b", "a"]), (2, ["a", "b", "c"])]


def test_agreement_uses_the_larger_of_relative_and_absolute_tolerance():
    assert agreement(1.00009, 1.0, rel=1e-4)
    assert not agreement(1.0002, 1.0, rel=1e-4)
    assert agreement(0.0005, 0.0, rel=1e-4, abs_=1e-3)  # near zero the absolute bound applies
    assert not agreement(float("nan"), 1.0, rel=1.0)


def test_dir_bytes_counts_every_file_below(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"\0" * 10)
    (tmp_path / "y.json").write_text("{}")
    assert dir_bytes(tmp_path) == 12


def test_write_section_replaces_its_own_section_and_keeps_the_others(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    write_section(path, "a", "first a\n")  # a new file: the title, then the section
    write_section(path, "b", "only b\n")
    write_section(path, "a", "second a\n")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "first a" not in text
    assert text.index("<!-- bench:a:begin -->\nsecond a\n<!-- bench:a:end -->") < text.index("only b")
    assert text.count("<!-- bench:a:begin -->") == 1 and text.endswith("<!-- bench:b:end -->\n")
