"""The config loader must reject every mistake up front, all at once, in words that say the fix."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mdiff.config import ExperimentConfig, load_config, parse_config
from pipeline.config import CacheSpec, HookSpec, ModelSpec, SourceSpec, TokenSpec
from pipeline.config_files import dump_config
from pipeline.typed_config import ConfigError, from_mapping
from tests.support import leaf_paths

# --------------------------------------------------------------------------------------------------
# Fixtures: a throwaway project directory with the files a valid config points at
# --------------------------------------------------------------------------------------------------


def make_project(root: Path) -> Path:
    (root / "models" / "base").mkdir(parents=True, exist_ok=True)
    (root / "models" / "base" / "config.json").write_text("{}")
    (root / "models" / "tiny.gguf").write_bytes(b"GGUF")
    (root / "data" / "more").mkdir(parents=True, exist_ok=True)
    (root / "data" / "prose.txt").write_text("One paragraph.\n\nAnother.\n")
    (root / "data" / "more" / "a.txt").write_text("x\n")
    (root / "data" / "more" / "b.txt").write_text("y\n")
    (root / "data" / "chats.jsonl").write_text('{"messages": []}\n')
    (root / "data" / "tok.parquet").write_bytes(b"PAR1")
    (root / "data" / "saved").mkdir(exist_ok=True)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path)


@pytest.fixture(scope="module")
def fuzz_project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("fuzz"))


VALID_TOML = """\
name = "pythia-diff"
store = "store"

[[models]]
name = "base"
path = "models/base"

[[models]]
name = "chat"
repo = "EleutherAI/pythia-70m"
revision = "step512"
dtype = "bfloat16"
device = "cuda:1"

[[hooks]]
layer = 3

[[hooks]]
layer = 3
site = "resid_pre"

[tokens]
context_length = 128
n_tokens = 131072
validation_fraction = 0.1
seed = 7
tokenizer = "chat"

[[tokens.sources]]
kind = "text"
paths = ["data/prose.txt", "data/more/*.txt"]
weight = 2
text_unit = "line"

[[tokens.sources]]
kind = "hf"
name = "roneneldan/TinyStories"
column = "text"

[cache]
chunk_tokens = 1024
shard_tokens = 8192
batch_size = 4
scale_sample_tokens = 4096
"""

VALID_YAML = """\
name: gguf_run.v2
store: s3://bucket/runs/x
storage_options:
  anon: true
  client_kwargs: {region_name: eu-west-1}
models:
  - name: q8
    gguf: models/tiny.gguf
    dtype: float32
    device: cpu
hooks:
  - {layer: 0, site: resid_pre}
tokens:
  context_length: 64
  n_tokens: 6400
  validation_fraction: 0
  sources:
    - kind: jsonl
      paths: [data/*.jsonl]
      chat: "yes"
    - kind: tokenized
      name: data/saved
      weight: 0.5
    - kind: tokenized
      paths: [data/tok.parquet]
cache:
  storage_dtype: float32
  compression: zstd
  chunk_tokens: 64
  shard_tokens: 640
  scale_sample_tokens: 64
"""


def valid_mapping() -> dict:
    """The TOML example as a plain dict, for mutating one field at a time."""
    return {
        "name": "pythia-diff",
        "store": "store",
        "models": [
            {"name": "base", "path": "models/base"},
            {"name": "chat", "repo": "EleutherAI/pythia-70m", "revision": "step512"},
        ],
        "hooks": [{"layer": 3}, {"layer": 3, "site": "resid_pre"}],
        "tokens": {
            "context_length": 128,
            "n_tokens": 131072,
            "validation_fraction": 0.1,
            "tokenizer": "chat",
            "sources": [
                {"kind": "text", "paths": ["data/prose.txt", "data/more/*.txt"]},
                {"kind": "hf", "name": "roneneldan/TinyStories"},
            ],
        },
        "cache": {"chunk_tokens": 1024, "shard_tokens": 8192, "scale_sample_tokens": 4096},
    }


def write_yaml(directory: Path, data: object, name: str = "experiment.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for line in message.splitlines():  # every line names the file, so any one line is actionable
        assert line.startswith(f"{path}: "), line
    return message


# --------------------------------------------------------------------------------------------------
# Valid configs
# --------------------------------------------------------------------------------------------------


def test_valid_toml_parses_to_expected_dataclasses(project: Path) -> None:
    path = project / "experiment.toml"
    path.write_text(VALID_TOML)
    cfg = load_config(path)
    p = str(project)
    assert cfg == ExperimentConfig(
        name="pythia-diff",
        store=f"{p}/store",
        models=[
            ModelSpec(name="base", path=f"{p}/models/base"),
            ModelSpec(name="chat", repo="EleutherAI/pythia-70m", revision="step512", dtype="bfloat16",
                      device="cuda:1"),
        ],
        hooks=[HookSpec(layer=3), HookSpec(layer=3, site="resid_pre")],
        tokens=TokenSpec(
            sources=[
                SourceSpec(kind="text", paths=[f"{p}/data/prose.txt", f"{p}/data/more/*.txt"], weight=2.0,
                           text_unit="line"),
                SourceSpec(kind="hf", name="roneneldan/TinyStories", column="text"),
            ],
            context_length=128,
            n_tokens=131072,
            validation_fraction=0.1,
            seed=7,
            tokenizer="chat",
        ),
        cache=CacheSpec(chunk_tokens=1024, shard_tokens=8192, batch_size=4, scale_sample_tokens=4096),
        source_file=str(path),
    )
    assert type(cfg.tokens.sources[0].weight) is float
    assert cfg.model("chat").revision == "step512"


def test_valid_yaml_parses_to_expected_dataclasses(project: Path) -> None:
    path = project / "exp.yml"
    path.write_text(VALID_YAML)
    cfg = load_config(path)
    p = str(project)
    assert cfg.store == "s3://bucket/runs/x"  # URLs are left alone
    assert cfg.storage_options == {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}
    assert cfg.models == [ModelSpec(name="q8", gguf=f"{p}/models/tiny.gguf", dtype="float32", device="cpu")]
    assert cfg.hooks == [HookSpec(layer=0, site="resid_pre")]
    assert cfg.tokens.validation_fraction == 0.0
    assert cfg.tokens.sources == [
        SourceSpec(kind="jsonl", paths=[f"{p}/data/*.jsonl"], chat="yes"),
        SourceSpec(kind="tokenized", name=f"{p}/data/saved", weight=0.5),
        SourceSpec(kind="tokenized", paths=[f"{p}/data/tok.parquet"]),
    ]
    assert cfg.cache == CacheSpec(storage_dtype="float32", compression="zstd", chunk_tokens=64,
                                  shard_tokens=640, scale_sample_tokens=64)
    assert cfg.source_file == str(path)


def test_relative_paths_resolve_against_the_config_file_not_the_cwd(project: Path, tmp_path_factory,
                                                                     monkeypatch) -> None:
    (project / "configs").mkdir()
    mapping = valid_mapping()
    mapping["models"][0]["path"] = "../models/base"
    mapping["tokens"]["sources"][0]["paths"] = ["../data/prose.txt"]
    mapping["store"] = "../stores/run"
    path = write_yaml(project / "configs", mapping)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    cfg = load_config(path)
    assert cfg.models[0].path == str(project / "models" / "base")
    assert cfg.tokens.sources[0].paths == [str(project / "data" / "prose.txt")]
    assert cfg.store == str(project / "stores" / "run")


def test_config_named_by_a_relative_path_records_its_absolute_path(project: Path, monkeypatch) -> None:
    (project / "configs").mkdir()
    mapping = valid_mapping()
    mapping["models"][0]["path"] = "../models/base"
    mapping["tokens"]["sources"][0]["paths"] = ["../data/*.txt"]
    write_yaml(project / "configs", mapping)
    monkeypatch.chdir(project)
    cfg = load_config("configs/experiment.yaml")
    assert cfg.source_file == str(project / "configs" / "experiment.yaml")
    assert cfg.models[0].path == str(project / "models" / "base")
    assert cfg.tokens.sources[0].paths == [str(project / "data" / "*.txt")]


def test_parse_config_resolves_against_base_dir(project: Path) -> None:
    cfg = parse_config(valid_mapping(), base_dir=project)
    assert cfg.models[0].path == str(project / "models" / "base")
    assert cfg.source_file is None


# --------------------------------------------------------------------------------------------------
# Bad configs: each names the file, the key path and the fix
# --------------------------------------------------------------------------------------------------


def _set(data: dict, dotted: str, value: object) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[int(key)] if isinstance(data, list) else data[key]
    if isinstance(data, list):
        data[int(last)] = value
    else:
        data[last] = value


def _delete(data: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[int(key)] if isinstance(data, list) else data[key]
    del data[last]


BAD_VALUES = [
    # (key to set, value, substrings the message must hold)
    ("stroe", "x", ["stroe: unknown key", "did you mean 'store'?", "valid keys here: name, store"]),
    ("tokens.sources.0.colum", "text",
     ["tokens.sources[0].colum: unknown key", "did you mean 'column'?", "valid keys here: kind"]),
    ("source_file", "/x.toml", ["source_file: is set by the loader", "remove it"]),
    ("tokens.context_length", "128",
     ["tokens.context_length: expected an integer, got string '128'", "write 128 as a bare number"]),
    ("tokens.n_tokens", 1.5e5, ["tokens.n_tokens: expected an integer", "write it without a fractional part: 150000"]),
    ("hooks.0.layer", True, ["hooks[0].layer: expected an integer, got boolean true", "write an integer"]),
    ("tokens.validation_fraction", False, ["tokens.validation_fraction: expected a number, got boolean"]),
    ("models.0.name", 7, ["models[0].name: expected a string, got integer 7", 'quote it: "7"']),
    ("models.0.dtype", "fp16",
     ["models[0].dtype: 'fp16' is not one of 'auto', 'float32', 'bfloat16' "
      "(float16 overflows on real residual streams; use bfloat16)"]),
    ("hooks.0.site", "resid_psot", ["hooks[0].site: 'resid_psot' is not one of", "did you mean 'resid_post'?"]),
    ("tokens.sources.0.chat", True, ["tokens.sources[0].chat", "quote the value"]),
    ("tokens.sources.0.paths", "data/prose.txt",
     ["tokens.sources[0].paths: expected a list of strings, got string", "wrap it in a list"]),
    ("models", {"name": "x", "repo": "a/b"}, ["models: expected a list of tables", "[[models]]"]),
    ("tokens", [1], ["tokens: expected a table, got list"]),
    ("models.0.path", "models/nope", ["models[0].path: no such directory: ", "/models/nope", "check the path"]),
    ("models.0.path", "models/tiny.gguf", ["models[0].path: ", "is a file, not a directory", "use gguf"]),
    ("models.0.device", "gpu", ["models[0].device: 'gpu' is not a device", "cuda:N"]),
    ("models.0.name", "my model", ["models[0].name: 'my model' contains ' '", "letters, digits"]),
    ("models.0.name", "", ["models[0].name: is empty"]),
    ("models.0.repo", "a/b", ["models[0]: sets repo and path", "keep exactly one"]),
    ("models.1.repo", None, ["models[1]: says nowhere to load weights from", "models[1].revision: is set without repo"]),
    ("models.1.gguf", "models/tiny.bin", ["models[1]: sets repo and gguf", "models[1].gguf: ", "does not end in .gguf"]),
    ("models", [], ["models: is empty", "add at least one [[models]]"]),
    ("models.1.name", "base", ["models[1].name: 'base' is already used by models[0]", "unique"]),
    ("hooks.1", {"layer": 3}, ["hooks[1]: repeats hooks[0] (layer 3, resid_post)", "remove the duplicate"]),
    ("hooks.0.layer", -1, ["hooks[0].layer: is negative (-1)"]),
    ("hooks", [], ["hooks: is empty"]),
    ("tokens.sources.0.paths", ["data/*.md"],
     ["tokens.sources[0].paths[0]: glob 'data/*.md' matches no file", "fix the pattern"]),
    ("tokens.sources.0.paths", ["data/prose.txt", "data/missing.txt"],
     ["tokens.sources[0].paths[1]: no such file: ", "/data/missing.txt"]),
    ("tokens.sources.0.paths", ["data"], ["tokens.sources[0].paths[0]: ", "is a directory", "data/*"]),
    ("tokens.sources.0.paths", [], ["tokens.sources[0].paths: is empty; kind 'text' reads local files"]),
    ("tokens.sources.1.paths", ["data/prose.txt"], ["tokens.sources[1].paths: is not read by kind 'hf'"]),
    ("tokens.sources.1.name", None, ["tokens.sources[1].name: is required for kind 'hf'"]),
    ("tokens.sources.0.weight", 0, ["tokens.sources[0].weight: is 0.0", "must be > 0"]),
    ("tokens.sources.0.weight", float("inf"), ["tokens.sources[0].weight: inf is not a finite number"]),
    ("tokens.sources.0", {"kind": "tokenized"}, ["tokens.sources[0]: kind 'tokenized' needs name or paths"]),
    ("tokens.sources.0", {"kind": "tokenized", "name": "data/saved", "paths": ["data/tok.parquet"]},
     ["tokens.sources[0]: kind 'tokenized' sets both name and paths"]),
    ("tokens.sources.0", {"kind": "tokenized", "paths": ["data/prose.txt"]},
     ["tokens.sources[0].paths[0]: ", "prose.txt is not a .jsonl or .parquet file"]),
    ("tokens.sources.0", {"kind": "tokenized", "name": "data/nope"},
     ["tokens.sources[0].name: no such directory", "save_to_disk"]),
    ("tokens.sources", [], ["tokens.sources: is empty"]),
    ("tokens.n_tokens", -1, ["tokens.n_tokens: is negative (-1)", "it is a size"]),
    ("tokens.n_tokens", 100, ["tokens.n_tokens: 100 is less than context_length 128", "at least 128"]),
    ("tokens.n_tokens", 1152, ["tokens.validation_fraction: 0.1 of 9 sequences leaves the validation split empty",
                               "raise n_tokens to at least 1280, or set validation_fraction = 0"]),
    ("tokens.context_length", 1, ["tokens.context_length: is 1", "at least 2"]),
    ("tokens.context_length", -4, ["tokens.context_length: is negative (-4)"]),
    ("tokens.validation_fraction", 1, ["tokens.validation_fraction: is 1.0", "[0, 1)"]),
    ("tokens.seed", -3, ["tokens.seed: is negative (-3)"]),
    ("tokens.tokenizer", "chta", ["tokens.tokenizer: 'chta' is not the name of a model", "did you mean 'chat'?"]),
    ("cache.shard_tokens", 1000,
     ["cache.shard_tokens: 1000 is not a multiple of cache.chunk_tokens 1024", "whole chunks; use 1024",
      "cache.shard_tokens: 1000 is not a multiple of tokens.context_length 128"]),
    ("cache.chunk_tokens", 0, ["cache.chunk_tokens: is 0"]),
    ("cache.shard_tokens", -8192, ["cache.shard_tokens: is negative (-8192)"]),
    ("cache.batch_size", 0, ["cache.batch_size: is 0"]),
    ("cache.scale_sample_tokens", 100, ["cache.scale_sample_tokens: 100 is less than tokens.context_length 128"]),
    ("cache.storage_dtype", "float16", ["cache.storage_dtype: 'float16' is not one of", "use bfloat16"]),
    ("cache.colour", 1, ["cache.colour: unknown key", "valid keys here: storage_dtype"]),
    ("storage_options", {"anon": True}, ["storage_options: is set but store is a local path"]),
    ("store", "", ["store: is empty", "s3://"]),
    ("name", "a/b", ["name: 'a/b' contains '/'"]),
    ("tokens.n_tokens", 2**70, ["tokens.n_tokens: ", "is out of range"]),
]


@pytest.mark.parametrize("key, value, expected", BAD_VALUES, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_VALUES])
def test_bad_value_is_reported_with_key_file_and_fix(project: Path, key: str, value: object,
                                                     expected: list[str]) -> None:
    data = valid_mapping()
    _set(data, key, value)
    message = problems_of(write_yaml(project, data))
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    assert "experiment.yaml" in message


@pytest.mark.parametrize("key, expected", [
    ("tokens", "tokens: required key is missing (add it: a table with keys sources, context_length"),
    ("models.0.name", "models[0].name: required key is missing (add it: a string)"),
    ("tokens.sources.0.kind", "tokens.sources[0].kind: required key is missing (add it: one of 'hf', 'text'"),
    ("hooks.0.layer", "hooks[0].layer: required key is missing (add it: an integer)"),
])
def test_missing_required_key_is_named(project: Path, key: str, expected: str) -> None:
    data = valid_mapping()
    _delete(data, key)
    assert expected in problems_of(write_yaml(project, data))


def test_shard_suggestion_satisfies_both_chunk_and_context(project: Path) -> None:
    data = valid_mapping()
    data["tokens"]["context_length"] = 96  # lcm(1024, 96) = 3072; nearest multiple to 8192 is 9216
    message = problems_of(write_yaml(project, data))
    assert "cache.shard_tokens: 8192 is not a multiple of tokens.context_length 96" in message
    assert "the job writes whole sequences per shard; use 9216" in message


def test_all_problems_in_one_file_are_reported_together(project: Path) -> None:
    path = project / "experiment.toml"
    path.write_text(VALID_TOML.replace('tokenizer = "chat"', 'tokenizer = "chat"\nn_tokns = 5')
                    .replace('device = "cuda:1"', 'device = "cuda1"'))
    message = problems_of(path)
    lines = message.splitlines()
    assert len(lines) == 2, message
    assert "models[1].device: 'cuda1' is not a device" in message
    assert "tokens.n_tokns: unknown key (did you mean 'n_tokens'?" in message


def test_type_error_does_not_hide_unrelated_semantic_problems(project: Path) -> None:
    data = valid_mapping()
    data["models"][0]["dtype"] = "half"
    data["tokens"]["n_tokens"] = -1
    data["hooks"][0]["layer"] = -2
    message = problems_of(write_yaml(project, data))
    assert "models[0].dtype" in message
    assert "tokens.n_tokens: is negative" in message
    assert "hooks[0].layer: is negative" in message


# --------------------------------------------------------------------------------------------------
# Files: missing, unreadable, malformed
# --------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "exp.json"
    path.write_text("{}")
    with pytest.raises(ConfigError, match=r"exp\.json: unsupported extension '\.json'"):
        load_config(path)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "experiment.toml"
    path.write_text('name = "x"\nstore = \n')
    with pytest.raises(ConfigError, match=r"experiment\.toml: TOML syntax error: .*line 2"):
        load_config(path)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("name: x\nmodels: [\n  - a\nstore: {\n")
    with pytest.raises(ConfigError, match=r"experiment\.yaml: line \d+, column \d+: YAML syntax error"):
        load_config(path)


def test_yaml_never_constructs_python_objects(tmp_path: Path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"experiment\.yaml: line 1, column 7: YAML error: could not determine"):
        load_config(path)


@pytest.mark.parametrize("text, expected", [
    ("", "the config is empty"),
    ("- 1\n- 2\n", "(top level): expected a table, got list"),
    ("name: x\n1: 2\n", "key 1 is not a string"),
])
def test_yaml_of_the_wrong_shape(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(text)
    assert expected in problems_of(path)


def test_config_error_survives_pickling() -> None:
    err = ConfigError("a.toml", ["x: bad (fix)", "y: worse (fix)"])
    back = pickle.loads(pickle.dumps(err))
    assert back.problems == err.problems and str(back) == str(err) == "a.toml: x: bad (fix)\na.toml: y: worse (fix)"


# --------------------------------------------------------------------------------------------------
# The generic converter, on a section shaped like ones later stages will add
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inner:
    tag: str


@dataclass(frozen=True)
class _Section:
    lr: float
    steps: int
    flag: bool = False
    mode: Literal["adam", "sgd"] = "adam"
    tags: list[str] = field(default_factory=list)
    inner: _Inner | None = None
    inners: list[_Inner] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def test_from_mapping_builds_any_dataclass() -> None:
    errors: list[str] = []
    out = from_mapping(_Section, {"lr": 3, "steps": 10, "flag": True, "tags": ["a"], "inner": {"tag": "x"},
                                  "inners": [{"tag": "y"}], "extra": {"k": [1]}}, "train", errors)
    assert errors == []
    assert out == _Section(lr=3.0, steps=10, flag=True, tags=["a"], inner=_Inner("x"), inners=[_Inner("y")],
                           extra={"k": [1]})
    assert type(out.lr) is float


def test_from_mapping_collects_every_type_error() -> None:
    errors: list[str] = []
    out = from_mapping(_Section, {"lr": True, "steps": 1.0, "flag": 1, "mode": "adm", "inners": [{"tg": 1}]},
                       "train", errors)
    assert out is None
    text = "\n".join(errors)
    assert "train.lr: expected a number, got boolean true" in text
    assert "train.steps: expected an integer, got number 1.0" in text
    assert "train.flag: expected true or false, got integer 1" in text
    assert "train.mode: 'adm' is not one of 'adam', 'sgd' (did you mean 'adam'?)" in text
    assert "train.inners[0].tg: unknown key (did you mean 'tag'?" in text
    assert "train.inners[0].tag: required key is missing" in text


# --------------------------------------------------------------------------------------------------
# Round trip and fuzzing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text", [("experiment.toml", VALID_TOML), ("experiment.yaml", VALID_YAML)])
def test_dump_config_round_trips(project: Path, name: str, text: str) -> None:
    path = project / name
    path.write_text(text)
    cfg = load_config(path)
    dumped = dump_config(cfg)
    assert "source_file" not in dumped
    assert json.loads(json.dumps(dumped)) == dumped
    again = parse_config(copy.deepcopy(dumped), base_dir="/somewhere/else")
    assert again == dataclasses.replace(cfg, source_file=None)
    assert dump_config(again) == dumped


_SAFE_TEXT = st.text(st.characters(exclude_characters="/~\\", exclude_categories=("Cs",)), max_size=12)
_KEYS = st.sampled_from(sorted({f.name for cls in (ExperimentConfig, ModelSpec, HookSpec, TokenSpec, SourceSpec,
                                                   CacheSpec) for f in dataclasses.fields(cls)})) | _SAFE_TEXT
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | _SAFE_TEXT
            | st.sampled_from(["hf", "text", "tokenized", "auto", "cpu", "base", "chat", "*", "**", "data",
                               "models/base", "resid_pre", "bfloat16", "s3://b/x", ""]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
                       max_leaves=20)




@st.composite
def _near_valid(draw) -> dict:
    data = valid_mapping()
    target = draw(st.sampled_from(leaf_paths(data)))
    parent = data
    for k in target[:-1]:
        parent = parent[k]
    action = draw(st.sampled_from(["nudge", "replace", "delete", "add"]))
    old = parent[target[-1]]
    if action == "nudge" and isinstance(old, int) and not isinstance(old, bool):
        parent[target[-1]] = draw(st.integers(-3, 2 * old + 3))  # same type, maybe a bad value
    elif action == "nudge" and isinstance(old, float):
        parent[target[-1]] = draw(st.floats(-1, 2))
    elif action in ("nudge", "replace"):
        parent[target[-1]] = draw(_VALUES)
    elif action == "delete":
        del parent[target[-1]]
    elif isinstance(parent, dict):
        parent[draw(_KEYS)] = draw(_VALUES)
    else:
        parent.append(draw(_VALUES))
    return data


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_VALUES | _near_valid())
def test_fuzz_parse_config_only_raises_config_error(fuzz_project: Path, data: object) -> None:
    try:
        cfg = parse_config(data, source="fuzz.yaml", base_dir=fuzz_project)
    except ConfigError as e:
        assert str(e).startswith("fuzz.yaml: ")
    else:
        assert isinstance(cfg, ExperimentConfig)
        assert parse_config(dump_config(cfg)) == cfg


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=80), suffix=st.sampled_from([".toml", ".yaml"]))
def test_fuzz_load_config_text_only_raises_config_error(tmp_path_factory, text: str, suffix: str) -> None:
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(ConfigError):
        load_config(path)
