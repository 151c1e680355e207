"""Where a `store = ...` value points: local paths (plain or file://) resolve against the config
file's directory, remote URLs stay as written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from mdiff.cli import main as cli_main
from mdiff.config import load_config
from mdiff.tiny import build_fixture, write_config
from pipeline import store as S
from pipeline.locations import is_remote, resolve_store


@pytest.mark.parametrize("store, remote", [("s3://bucket/x", True), ("memory://x", True), ("gs://b", True),
                                           ("file:///abs/store", False), ("file://runs/store", False),
                                           ("runs/store", False), ("/abs/store", False)])
def test_only_non_file_urls_are_remote(store, remote):
    assert is_remote(store) is remote


def test_local_stores_resolve_against_the_base_directory():
    assert resolve_store("file://runs/store", "/cfg/dir") == "/cfg/dir/runs/store"
    assert resolve_store("runs/store", "/cfg/dir") == "/cfg/dir/runs/store"
    assert resolve_store("file:///abs/store", "/cfg/dir") == "/abs/store"
    assert resolve_store("s3://bucket/prefix", "/cfg/dir") == "s3://bucket/prefix"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("store", ["file://runs/store", "runs/store"])
def test_a_relative_store_in_a_config_resolves_against_the_config_file(fixture, tmp_path, monkeypatch, store):
    config_dir = tmp_path / "experiments"
    path = write_config(config_dir / "exp.toml", fixture, store=store)
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(path))
    assert cfg.store == str(config_dir / "runs" / "store")
    root = S.StoreRoot(cfg.store)
    root.ensure_format(create=True)
    assert (config_dir / "runs" / "store" / "mdiff.json").is_file()
    assert not (elsewhere / "runs").exists()


def _store_holding(directory, ts_id: str) -> None:
    root = S.StoreRoot(str(directory))
    root.ensure_format(create=True)
    S.write_token_set(root, ts_id, 2, 4, [(np.zeros((2, 4), np.int32), np.zeros(2, np.uint8))],
                      {"n_train_sequences": 1})


def test_commands_open_the_store_beside_the_config_not_the_one_in_the_working_directory(
        fixture, tmp_path, monkeypatch, capsys):
    """Two stores at the same relative path: the one beside the config is opened, wherever the
    command runs; the one under the working directory is never read."""
    config_dir, elsewhere = tmp_path / "experiments", tmp_path / "somewhere-else"
    _store_holding(config_dir / "rel" / "dir", "ts-00000000000000c0")
    _store_holding(elsewhere / "rel" / "dir", "ts-00000000000000ee")  # a decoy
    path = write_config(config_dir / "exp.toml", fixture, store="file://rel/dir")
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(path, elsewhere))
    assert S.list_token_sets(S.StoreRoot(cfg.store)) == ["ts-00000000000000c0"]
    assert cli_main(["status", os.path.relpath(path, elsewhere)]) == 0
    out = capsys.readouterr().out
    assert "ts-00000000000000c0" in out and "ts-00000000000000ee" not in out
    assert S.open_token_set(S.StoreRoot(cfg.store), "ts-00000000000000c0").n_sequences == 2
