"""Bad input, end to end through the CLI: each is refused with one clear line that names the bad
value and the fix, exit status 2, and nothing written (the store and output folders unchanged).

Also a fuzz of the config loader over configs with every section, nested values included: no
input may give anything but a ConfigError or a valid config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evals import config as EC
from mdiff.cli import main as cli_main
from mdiff.config import ExperimentConfig, load_config, parse_config
from mdiff.tiny import make_model, make_tokenizer
from pipeline import config as C
from pipeline.cache import run_cache
from pipeline.config_files import dump_config, write_config
from pipeline.typed_config import ConfigError
from tests.reliability.fault_kit import BTK, Kit, snapshot, train_sweep
from tests.support import leaf_paths
from trainer import config as TC
from trainer import train as T

COMMIT = "3" * 40


@pytest.fixture(scope="module")
def odd(kit: Kit, tmp_path_factory) -> dict:
    """Models that do not fit with the kit's: another tokenizer, another width, and a hub mirror
    (a hand-made local hub cache, as the hub would leave it) with only revision step512."""
    d = tmp_path_factory.mktemp("odd")
    other_tok = make_tokenizer(["zebra quartz xylophone vortex " * 4, "nothing like the corpus"] * 40,
                               vocab_size=280)
    hub = d / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / COMMIT
    shutil.copytree(kit.fx["models"]["llama-s0"], snap)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "step512").write_text(COMMIT)
    return {
        "other-tokenizer": make_model(d / "other-tok", other_tok, "llama", d_model=32, n_layers=3),
        "wide": make_model(d / "wide", kit.fx["tokenizer"], "llama", d_model=48, n_layers=3),
        "hub": hub,
    }


def _model(name: str, path, **keys) -> list[dict]:
    return [{"name": name, "path": str(path), **keys}]


def _patch(path: Path, changes: dict) -> None:
    """Merge `changes` into the config at `path` (a None value removes the key it names) and write
    it back: still valid TOML, though maybe not a valid config."""
    def merge(into: dict, changes: dict) -> None:
        for key, value in changes.items():
            if isinstance(value, dict):
                merge(into[key], value)
            else:
                assert value is not None or key in into, key
                into[key] = value

    data = tomllib.loads(path.read_text())
    merge(data, changes)
    write_config(path, data)  # None values are left out


def _cases(kit: Kit, odd: dict):
    """(name, config edits, expected message parts): each config is valid TOML."""
    return {
        "tokenizer": (dict(extra_models=_model("odd", odd["other-tokenizer"])),
                      ["'llama-s0'", "'odd'", "must share a tokenizer"]),
        "hook past the last layer": (dict(hooks=((7, "resid_post"),)),
                                     ["hooks:", "has 3 layers", "0..2, got layer 7", "fix [[hooks]]"]),
        "unknown revision": (dict(extra_models=[{"name": "late", "repo": "org/tiny", "revision": "step999"}]),
                             ["'late'", "'step999'", "cached: step512", "check the revision name"]),
        "unknown key": (dict(patch={"cache": {"batch_size": None, "batch_sise": 8}}),
                        ["cache.batch_sise: unknown key", "did you mean 'batch_size'?"]),
        "wrong type": (dict(patch={"tokens": {"context_length": "16"}}),
                       ["tokens.context_length: expected an integer, got string '16'",
                        "write 16 as a bare number"]),
        "negative size": (dict(patch={"tokens": {"n_tokens": -2048}}),
                          ["tokens.n_tokens: is negative (-2048)", "it is a size"]),
        "crosscoder over two widths": (
            dict(models=("llama-s0",), extra_models=_model("wide", odd["wide"]),
                 train=train_sweep(dictionaries=(BTK,), models=("llama-s0", "wide"))),
            ["train.models: a crosscoder needs the same d_model", "llama-s0: 32, wide: 48",
             "train one SAE per model"]),
    }


CASES = ["tokenizer", "hook past the last layer", "unknown revision", "unknown key", "wrong type",
         "negative size", "crosscoder over two widths"]


@pytest.fixture(scope="module")
def shared_store(kit: Kit, tmp_path_factory) -> Path:
    """A store other experiments already filled: refused experiments must leave it untouched."""
    return kit.store_copy(tmp_path_factory.mktemp("shared") / "store")


@pytest.mark.parametrize("case", CASES)
def test_refused_before_anything_is_written(kit: Kit, odd: dict, shared_store: Path, tmp_path,
                                            monkeypatch, capsys, case: str):
    monkeypatch.setenv("HF_HUB_CACHE", str(odd["hub"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    edits, expected = _cases(kit, odd)[case]
    edits = dict(edits)
    patch = edits.pop("patch", None)
    cfg = kit.config(tmp_path / "exp.toml", store=shared_store, **edits)
    if patch:
        _patch(cfg, patch)
    before = snapshot(shared_store)
    assert cli_main(["cache", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for part in expected:
        assert part in err, (part, err)
    assert snapshot(shared_store) == before
    # and in a store that does not exist yet, not even the folder appears
    fresh = tmp_path / "fresh"
    _patch(cfg, {"store": str(fresh)})
    assert cli_main(["cache", str(cfg), "--no-progress"]) == 2
    assert not fresh.exists()


def test_store_of_a_future_format_is_refused(kit: Kit, tmp_path, capsys):
    store = kit.store_copy(tmp_path / "store")
    (store / "mdiff.json").write_text(json.dumps({"format": "mdiff-store", "version": 2}))
    cfg = kit.config(tmp_path / "exp.toml", store=store, train=train_sweep(dictionaries=(BTK,)))
    before = snapshot(store)
    for command in ("cache", "train", "status", "verify"):
        assert cli_main([command, str(cfg)]) == 2, command
        err = capsys.readouterr().err
        assert "store format 2" in err and "reads format 1" in err and "upgrade mdiff" in err, err
    assert snapshot(store) == before and not (tmp_path / "runs").exists()

    # a token set (or array) stamped by a newer writer inside a current store
    (store / "mdiff.json").write_text(json.dumps({"format": "mdiff-store", "version": 1}))
    ts_meta = next(store.glob("tokensets/*/zarr.json"))
    meta = json.loads(ts_meta.read_text())
    meta["attributes"]["format_version"] = 7
    ts_meta.write_text(json.dumps(meta))
    before = snapshot(store)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    assert "format 7" in capsys.readouterr().err
    assert snapshot(store) == before and not (tmp_path / "runs").exists()


def test_crosscoder_over_cached_models_of_two_widths_is_refused_by_training(kit: Kit, odd: dict,
                                                                           tmp_path, capsys):
    """Both models cached (as SAE inputs) in one store; a crosscoder over them cannot be trained."""
    store = kit.store_copy(tmp_path / "store")
    wide = kit.config(tmp_path / "wide.toml", store=store, models=("llama-s0",), hooks=((1, "resid_post"),),
                      extra_models=_model("wide", odd["wide"]))
    run_cache(load_config(wide), log=lambda *a: None, progress=False)
    train = train_sweep(dictionaries=(BTK,), models=("llama-s0", "wide"))
    cfg = kit.config(tmp_path / "cc.toml", store=store, models=("llama-s0",),
                     extra_models=_model("wide", odd["wide"]), train=train)
    before = snapshot(store)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for part in ("differ in d_model", ": 32", ": 48", "train one SAE per model"):
        assert part in err, (part, err)
    assert snapshot(store) == before and not (tmp_path / "runs").exists()


def test_dictionary_evaluated_on_another_store_is_refused(kit: Kit, tmp_path, capsys):
    section = train_sweep(steps=10, dictionaries=(BTK,), extra={"out_dir": str(tmp_path / "runs")})
    trained = kit.config(tmp_path / "trained.toml", store=kit.ref_store, train=section)
    T.run_train(load_config(trained), log=lambda *a: None, progress=False)
    elsewhere = kit.store_copy(tmp_path / "elsewhere")
    cfg = kit.config(tmp_path / "other.toml", store=elsewhere, train=section)
    before = snapshot(tmp_path / "runs")
    assert cli_main(["eval", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was trained on the store" in err and str(elsewhere) in err and "Traceback" not in err
    assert "use it with the experiment config it was trained with" in err
    assert snapshot(tmp_path / "runs") == before


# -- fuzzing the loader with every section ----------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-project")
    (d / "model").mkdir()
    (d / "model" / "config.json").write_text("{}")
    (d / "text.txt").write_text("a\n\nb\n")
    return d


def _full_mapping() -> dict:
    """A valid config using every section; the fuzz mutates it anywhere, however deep."""
    return {
        "name": "fuzz", "store": "store",
        "models": [{"name": "a", "path": "model"}, {"name": "b", "path": "model", "dtype": "bfloat16"}],
        "hooks": [{"layer": 1}, {"layer": 0, "site": "resid_pre"}],
        "tokens": {"context_length": 16, "n_tokens": 2048, "validation_fraction": 0.125,
                   "sources": [{"kind": "text", "paths": ["text.txt"], "weight": 2.0}]},
        "cache": {"chunk_tokens": 64, "shard_tokens": 256, "scale_sample_tokens": 256},
        "train": {"hook": "layer1.resid_post", "models": ["a", "b"], "steps": 40, "log_every": 10,
                  "checkpoint_every": 20, "dictionaries": [
                      {"name": "btk", "architecture": "batchtopk", "n_latents": 64, "k": 4},
                      {"name": "l1", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.5}]},
        "eval": {"n_sequences": 8, "shared_band": [0.3, 0.7], "dictionaries": ["btk"],
                 "token_classes": [{"name": "chat", "kind": "regex", "values": ["^<"]}]},
    }


_ALL_KEYS = sorted({f.name for cls in (ExperimentConfig, C.ModelSpec, C.HookSpec, C.TokenSpec,
                                        C.SourceSpec, C.CacheSpec, TC.TrainSpec, TC.DictionarySpec,
                                        EC.EvalSpec, EC.TokenClassSpec) for f in dataclasses.fields(cls)})
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | _TEXT
            | st.sampled_from(["relu", "batchtopk", "jumprelu", "topk", "layer1.resid_post", "a", "b",
                               "..", "checkpoints", "../x", "model", "text.txt", "regex", "[", ""]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(_ALL_KEYS) | _TEXT, inner, max_size=5),
                       max_leaves=25)


@st.composite
def _mutated(draw) -> dict:
    data = _full_mapping()
    for _ in range(draw(st.integers(1, 3))):  # up to three edits, anywhere
        places = leaf_paths(data)
        if not places:
            break
        target = draw(st.sampled_from(places))
        parent = data
        for k in target[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add", "scalar"]))
        if action == "delete":
            del parent[target[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(_ALL_KEYS) | _TEXT)] = draw(_VALUES)
        elif action == "add":
            parent.append(draw(_VALUES))
        else:
            parent[target[-1]] = draw(_SCALARS if action == "scalar" else _VALUES)
    return data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_mutated())
def test_fuzz_configs_with_every_section(project: Path, data: dict) -> None:
    try:
        cfg = parse_config(data, source="fuzz.toml", base_dir=project)
    except ConfigError as e:
        assert all(line.startswith("fuzz.toml: ") for line in str(e).splitlines()), str(e)
    else:
        assert isinstance(cfg, ExperimentConfig)
        assert parse_config(dump_config(cfg), base_dir=project) == cfg
