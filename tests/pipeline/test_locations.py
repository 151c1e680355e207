"""Where a `store = ...` value points: local paths (plain or file://) resolve against the config
file's directory, remote URLs stay as written."""

from __future__ import annotations

import os

import pytest

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
