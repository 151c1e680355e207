"""The [saebench] section: defaults, every rule, paths, and the configs shipped in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.saebench.config import FORTUNE_CLASSES, SaeBenchSpec
from mdiff.saebench import load_study
from mdiff.tiny import build_fixture, train_section, write_config
from pipeline.typed_config import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("sbconfig")
    return d, build_fixture(d, n_docs=40, d_model=16, n_layers=2)


def config(fixture, saebench=None, name="c"):
    d, fx = fixture
    sections = train_section(["llama-s0"], ['name = "topk"\narchitecture = "topk"\nn_latents = 32\nk = 4'])
    if saebench is not None:
        sections["saebench"] = saebench
    return write_config(d / f"{name}.toml", fx, store=str(d / "store"), train=sections)


def test_absent_section_gives_saebench_defaults(fixture):
    _, spec = load_study(config(fixture))
    assert spec == SaeBenchSpec()
    assert spec.absorption.prompt_template == "{word} has the first letter:" and spec.absorption.icl_examples == 10
    assert spec.probing.ks == [1, 2, 5, 10, 20, 50] and spec.probing.context_length == 128
    assert [d.kind for d in spec.probing.datasets] == ["fortunes"] and len(FORTUNE_CLASSES) == 5


def test_relative_paths_are_made_absolute_against_the_config_file(fixture):
    d, _ = fixture
    cfg, spec = load_study(config(fixture, {"out_dir": "study", "probing": {"datasets": [
        {"name": "t", "kind": "texts", "files": {"x": "x.txt", "y": "/abs/y.txt"}},
        {"name": "tab", "kind": "table", "path": "data/t.csv"}]}}))
    assert spec.out_dir == str(d / "study")
    assert spec.probing.datasets[0].files == {"x": str(d / "x.txt"), "y": "/abs/y.txt"}
    assert spec.probing.datasets[1].path == str(d / "data" / "t.csv")


BAD = [
    ({"dictionaries": ["nope"]}, "saebench.dictionaries[0]: 'nope' is not a [[train.dictionaries]] name"),
    ({"absorption": {"prompt_template": "has the first letter:"}}, "saebench.absorption.prompt_template"),
    ({"absorption": {"prompt_template": "{word} {other}"}}, "saebench.absorption.prompt_template"),
    ({"absorption": {"test_fraction": 1.0}}, "saebench.absorption.test_fraction: is 1.0"),
    ({"absorption": {"min_letters": 27}}, "saebench.absorption.min_letters: is 27"),
    ({"absorption": {"max_k": 0}}, "saebench.absorption.max_k: is 0"),
    ({"absorption": {"f1_jmp": 0.1}}, "did you mean 'f1_jump'?"),
    ({"probing": {"ks": [1, 1]}}, "saebench.probing.ks: is [1, 1]"),
    ({"probing": {"context_length": 1}}, "saebench.probing.context_length: is 1"),
    ({"probing": {"datasets": [{"name": "a", "kind": "texts", "files": {"x": "x.txt"}}]}},
     "saebench.probing.datasets[0].files: names 1 class(es)"),
    ({"probing": {"datasets": [{"name": "a", "kind": "table"}]}}, "saebench.probing.datasets[0].path: is missing"),
    ({"probing": {"datasets": [{"name": "a", "kind": "table", "path": "t.txt"}]}}, "neither .csv nor .jsonl"),
    ({"probing": {"datasets": [{"name": "a", "kind": "fortunes"}, {"name": "a", "kind": "fortunes"}]}},
     "name 'a' is used twice"),
    ({"probing": {"datasets": [{"name": "a/b", "kind": "fortunes"}]}}, "saebench.probing.datasets[0].name"),
]


@pytest.mark.parametrize("section, message", BAD, ids=[m for _, m in BAD])
def test_each_bad_value_is_reported_with_its_key(fixture, section, message):
    with pytest.raises(ConfigError) as err:
        load_study(config(fixture, section, name="bad"))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_problems_of_the_experiment_and_the_section_come_together(fixture):
    path = config(fixture, {"absorption": {"max_k": 0}}, name="both")
    path.write_text(path.read_text().replace("[tokens]", "[tokens]\nbogus = 1"))
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert any("bogus" in p for p in err.value.problems) and any("max_k" in p for p in err.value.problems)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("saebench-*.toml")), ids=lambda p: p.name)
def test_shipped_study_configs_load(path):
    cfg, spec = load_study(path)
    assert cfg.train is not None and spec.probing.ks
    assert not spec.dictionaries or set(spec.dictionaries) <= {d.name for d in cfg.train.dictionaries}
