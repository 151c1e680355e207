"""Opening files must never run code, and names from configs must never reach outside the store or
the output folder.

- Weights and checkpoints are safetensors + JSON; the code has no unpickling call except
  `torch.load(weights_only=True)`, and nothing is evaluated as code (checked on the source).
- A planted pickle (in a checkpoint, a dictionary, a model directory, an array's codec list)
  is refused, and its payload (creating a file) never runs.
- Names of experiments, models, dictionaries and token classes that would be paths ('..') are
  refused by the config; store paths with '..' are refused by the store, whoever names them
  (a dictionary's config.json names the arrays it was trained on).
"""

from __future__ import annotations

import ast
import builtins
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from mdiff.config import parse_config
from pipeline import models as M
from pipeline import store as S
from pipeline.config import ModelSpec
from pipeline.typed_config import ConfigError
from tests.reliability.fault_kit import Kit
from trainer import checkpoint as ckpt
from trainer.dictionaries import load_dictionary

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "trainer", "evals", "mdiff")


# -- the source ---------------------------------------------------------------------------------------
def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):  # x.load(...), or <expression>.eval() (a method)
                name = f"{f.value.id if isinstance(f.value, ast.Name) else '<expr>'}.{f.attr}"
            else:
                name = getattr(f, "id", "")
            yield name, node


def _keyword(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def _unsafe(name: str, node: ast.Call) -> str | None:
    if name in ("pickle.load", "pickle.loads", "marshal.load", "marshal.loads", "shelve.open",
                "dill.load", "dill.loads", "joblib.load") or name.endswith(".read_pickle"):
        return "unpickles"
    if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
        return "evaluates code"
    if name == "torch.load" and _keyword(node, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") not in (None, False):
        return "np.load with allow_pickle"
    if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
        return "yaml without safe_load"
    return None


def test_no_code_path_unpickles_or_evaluates():
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 15
    found = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node in _calls(tree):
            why = _unsafe(name, node)
            if why:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}: {why}")
    assert found == []


def test_the_source_scan_catches_what_it_looks_for():
    bad = ("import pickle, torch, yaml, numpy as np\npickle.loads(b)\ntorch.load(p)\n"
           "torch.load(p, weights_only=False)\nyaml.load(t)\nnp.load(p, allow_pickle=True)\neval(s)\n"
           "torch.load(p, weights_only=True)\nyaml.safe_load(t)\nnp.load(p)\nmodel.eval()\n")
    hits = [(_unsafe(n, c), c.lineno) for n, c in _calls(ast.parse(bad)) if _unsafe(n, c)]
    assert [line for _, line in hits] == [2, 3, 4, 5, 6, 7]


# -- planted pickles ----------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates `marker`: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}, protocol=2))
    pickle.loads(path.read_bytes())["weight"].close()  # the file is a working exploit for pickle
    assert marker.exists()
    marker.unlink()


def test_pickle_planted_in_a_checkpoint_or_a_dictionary_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    parts = {"d": {"tensors": {"dictionary": {"w": torch.ones(3)}}, "json": {}}}
    step = ckpt.save_checkpoint(tmp_path / "checkpoints", 10, parts, {"loader": {}})
    _plant(step / "d" / "dictionary.safetensors", marker)
    with pytest.raises(Exception, match="(?i)header|deserializ|invalid"):
        ckpt.load_part(ckpt.latest_checkpoint(tmp_path / "checkpoints"), "d")
    assert not marker.exists()

    d = tmp_path / "dictionary"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architecture": "relu", "n_models": 1, "d_model": 4, "n_latents": 8, "scales": [1.0],
        "folded": False, "spec": {"name": "x", "architecture": "relu", "n_latents": 8}}))
    _plant(d / "dictionary.safetensors", marker)
    with pytest.raises(Exception, match="(?i)header|deserializ|invalid"):
        load_dictionary(d)
    assert not marker.exists()


def test_pickle_planted_as_model_weights_never_runs(kit: Kit, tmp_path):
    """A model directory whose only weights are a pickled .bin: transformers opens .bin files
    with torch.load(weights_only=True), which refuses the payload."""
    src = shutil.copytree(kit.fx["models"]["llama-s0"], tmp_path / "src")
    for f in src.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "payload-ran"
    _plant(src / "pytorch_model.bin", marker)
    with pytest.raises(M.ModelLoadError) as e:
        M.load_model(ModelSpec(name="planted", path=str(src)), device="cpu")
    assert "'planted'" in str(e.value)
    assert not marker.exists()


def test_pickle_codec_planted_in_an_array_never_runs(tmp_path):
    """Array metadata is data from the store (maybe a shared bucket): a codec that would unpickle
    chunks is unknown to the reader, so the read fails instead of running the payload."""
    root = S.StoreRoot(str(tmp_path / "store"))
    arr = S.create_activation_array(root, S.activation_path("ts-x", "m-0", "layer0.resid_post"),
                                    n_rows=4, d_model=2, chunk_rows=4, shard_rows=4,
                                    storage_dtype="float32", compression="none", attrs={"scale": 1.0})
    arr.write_shard(0, np.ones((4, 2), np.float32))
    meta_path = tmp_path / "store" / arr.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}},
                      {"name": "numcodecs.pickle", "configuration": {}}]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [4, 2]
    meta_path.write_text(json.dumps(meta))
    marker = tmp_path / "payload-ran"
    (tmp_path / "store" / arr.path / "c" / "0" / "0").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(Exception, match="(?i)codec"):
        S.read_rows(S.open_activation_array(root, arr.path), 0, 4)
    assert not marker.exists()


def test_yaml_code_tags_are_refused_anywhere(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "exp.yaml"
    path.write_text(f"name: x\nstore: s3://b/x\nstorage_options:\n  client_kwargs:\n"
                    f"    k: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    from mdiff.config import load_config

    with pytest.raises(ConfigError, match="YAML error"):
        load_config(path)
    assert not marker.exists()


# -- names that would be paths ------------------------------------------------------------------------
def _mapping(tmp_path: Path) -> dict:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("x\n")
    return {"name": "exp", "store": "store", "models": [{"name": "a", "path": "model"}],
            "hooks": [{"layer": 0}],
            "tokens": {"context_length": 16, "n_tokens": 256, "validation_fraction": 0,
                       "sources": [{"kind": "text", "paths": ["t.txt"]}]},
            "cache": {"chunk_tokens": 64, "shard_tokens": 256, "scale_sample_tokens": 64},
            "train": {"dictionaries": [{"name": "d", "architecture": "relu"}]},
            "eval": {"token_classes": [{"name": "c", "kind": "special"}]}}


@pytest.mark.parametrize("where, name, expected", [
    (("name",), "..", "name: '..' is only dots"),
    (("name",), "../../etc", "name: '../../etc' contains '/'"),
    (("models", 0, "name"), "..", "models[0].name: '..' is only dots"),
    (("train", "dictionaries", 0, "name"), "..", "train.dictionaries[0].name: '..' is only dots"),
    (("train", "dictionaries", 0, "name"), "../x", "train.dictionaries[0].name: '../x' contains '/'"),
    (("train", "dictionaries", 0, "name"), "checkpoints", "'checkpoints' is the name of another output"),
    (("train", "dictionaries", 0, "name"), "eval", "'eval' is the name of another output"),
    (("eval", "token_classes", 0, "name"), ".", "eval.token_classes[0].name: '.' is only dots"),
])
def test_names_that_are_paths_are_refused(tmp_path, where, name, expected):
    data = _mapping(tmp_path)
    parse_config(data, base_dir=tmp_path)  # valid as it is
    target = data
    for k in where[:-1]:
        target = target[k]
    target[where[-1]] = name
    with pytest.raises(ConfigError) as e:
        parse_config(data, base_dir=tmp_path)
    assert expected in str(e.value)


def test_store_paths_cannot_leave_the_root(tmp_path):
    root = S.StoreRoot(str(tmp_path / "store"))
    root.ensure_format(create=True)
    # an array outside the root, where a crafted config.json could point
    outside = zarr.create_array(store=str(tmp_path / "outside"), shape=(4, 2), dtype="float32")
    outside[:] = 1
    for path in ("../outside", "activations/../../outside", "/etc", "activations/ts-x/./m/h"):
        with pytest.raises(S.StoreError, match="could leave the store root"):
            S.open_activation_array(root, path)
    with pytest.raises(S.StoreError, match="could leave the store root"):
        S.open_token_set(root, "../../outside")
    for args in (("..", "m", "layer0.resid_post"), ("ts-x", "../m", "h"), ("ts-x", "m", "..")):
        with pytest.raises(S.StoreError, match="could leave the store root"):
            S.activation_path(*args)
    with pytest.raises(S.StoreError, match="could leave the store root"):
        root.write_json("../escaped.json", {})
    assert not (tmp_path / "escaped.json").exists()
    assert S.activation_path("ts-0123", "org--m@step512-abc", "layer1.resid_post")  # real keys pass


def test_a_checkpoint_pointer_cannot_leave_the_checkpoint_folder(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    parts = {"d": {"tensors": {"dictionary": {"w": torch.ones(2)}}, "json": {}}}
    ckpt.save_checkpoint(d, 5, parts, {"loader": {}})
    evil = tmp_path / "evil"
    (evil / "d").mkdir(parents=True)
    (evil / "trainer_state.json").write_text(json.dumps({"step": 999}))
    (d / "latest.json").write_text(json.dumps({"step": 999, "path": "../../evil"}))
    assert ckpt.latest_checkpoint(d) == d / "step_000000005"
