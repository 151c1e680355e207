"""`mdiff saebench` end to end on tiny random models: every output written, SAEBench's files where
its scripts look, parts reused on a second run and recomputed when their settings change, a
crosscoder given its core files only, an absent dataset skipped with its reason."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from evals.saebench.study import run_study
from mdiff import saebench as app
from mdiff.tiny import build_fixture, train_section, write_config
from pipeline.cache import run_cache
from trainer import train as T

SAES = ['name = "topk"\narchitecture = "topk"\nn_latents = 48\nk = 4',
        'name = "relu"\narchitecture = "relu"\nn_latents = 48\nl1_coefficient = 0.05']
SECTION = {"absorption": {"min_letters": 1, "icl_examples": 2, "ksparse_epochs": 5, "max_k": 3},
           "probing": {"ks": [1, 2], "context_length": 16, "datasets": [
               {"name": "ab", "kind": "texts", "files": {"a": "a.txt", "b": "b.txt"}},
               {"name": "fortunes", "kind": "fortunes", "path": "no-such-dir"}]}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    fx = build_fixture(d, seeds=(0, 1), n_docs=150, d_model=16, n_layers=2)
    (d / "a.txt").write_text("\n\n".join(f"the king and the queen walked by the river {i}" for i in range(30)))
    (d / "b.txt").write_text("\n\n".join(f"bread wine water stone night star {i}" for i in range(30)))

    def config(name, models, dictionaries, section=SECTION):
        sections = train_section(models, dictionaries, steps=30, eval_every=30, eval_batches=1,
                                 checkpoint_every=30, read_threads=1)
        sections.update({"eval": {"n_sequences": 4, "batch_size": 4}, "saebench": section})
        return write_config(d / f"{name}.toml", fx, n_tokens=2048, hooks=((1, "resid_post"),),
                            store=str(d / "store"), storage_dtype="float32", name=name, train=sections)

    sae_path = config("sae", ["llama-s0"], SAES)
    cfg, spec = app.load_study(sae_path)
    run_cache(cfg, log=lambda *a: None, progress=False)
    T.run_train(cfg, log=lambda *a: None, progress=False)
    cc_path = config("cc", ["llama-s0", "llama-s1"], ['name = "cc"\narchitecture = "batchtopk"\nn_latents = 32\nk = 4'])
    cc_cfg, _ = app.load_study(cc_path)
    run_cache(cc_cfg, log=lambda *a: None, progress=False)
    T.run_train(cc_cfg, log=lambda *a: None, progress=False)
    logs: list[str] = []
    first = run_study(cfg, spec, progress=False, log=logs.append)
    return {"dir": d, "cfg": cfg, "spec": spec, "first": first, "logs": logs, "config": config, "cc": cc_path,
            "sae": sae_path}


def test_every_output_is_written(study):
    first, cfg = study["first"], study["cfg"]
    evals = first.out_dir.parent
    for name in ("topk", "relu"):
        folder = evals / name
        assert (folder / "splice.json").is_file()
        for kind in ("core", "absorption", "sparse_probing"):
            data = json.loads((folder / "eval_results" / kind / f"{name}_eval_results.json").read_text())
            assert data["sae_lens_id"] == name and data["sae_cfg_dict"]["d_sae"] == 48
        splice = json.loads((folder / "splice.json").read_text())
        assert "relative_reconstruction_bias" in splice["metrics"]["per_model"]["llama-s0"]
    for f in ("comparison.csv", "comparison.md", "metrics.png", "absorption.png", "probing.png", "study.json"):
        assert (first.out_dir / f).stat().st_size > 0
    header = (first.out_dir / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"explained_variance_legacy", "mean_absorption_fraction_score", "sae_top_1_test_accuracy",
            "llm_top_2_test_accuracy"} <= set(header)
    assert [r["dictionary"] for r in first.rows] == [d.name for d in cfg.train.dictionaries]
    assert "| topk |" in first.table


def test_rows_carry_the_measured_values(study):
    first = study["first"]
    for r in first.rows:
        splice = json.loads((first.out_dir.parent / r["dictionary"] / "splice.json").read_text())
        assert r["explained_variance"] == splice["metrics"]["per_model"]["llama-s0"]["explained_variance"]
        assert r["l0"] == splice["metrics"]["l0"]
        probing = json.loads((first.out_dir.parent / r["dictionary"] / "sparse_probing.json").read_text())
        assert r["sae_top_1_test_accuracy"] == probing["result"]["datasets"]["ab"]["sae_top_1_test_accuracy"]
        assert 0 <= r["sae_top_1_test_accuracy"] <= 1
        assert probing["result"]["skipped"]["fortunes"].startswith("no fortunes directory")
    assert any("dataset 'fortunes' skipped" in line for line in study["logs"])


def test_a_second_run_reuses_every_part_and_a_changed_setting_recomputes_its_part(study):
    cfg, spec = study["cfg"], study["spec"]
    again = run_study(cfg, spec, progress=False, log=lambda _: None)
    for name, rec in again.record["dictionaries"].items():
        assert rec["core"]["computed"] is False and rec["absorption"]["computed"] is False
        assert rec["probing"]["computed"] is False
    assert again.rows == study["first"].rows
    cfg2, spec2 = app.load_study(study["config"]("sae", ["llama-s0"], SAES, {
        **SECTION, "probing": {**SECTION["probing"], "ks": [1, 3]}}))
    changed = run_study(cfg2, spec2, progress=False, log=lambda _: None)
    for rec in changed.record["dictionaries"].values():
        assert rec["probing"]["computed"] is True and rec["absorption"]["computed"] is False
    assert "sae_top_3_test_accuracy" in changed.rows[0]
    run_study(cfg, spec, progress=False, log=lambda _: None)  # back to the module's settings


def test_a_crosscoder_gets_its_core_files_only(study):
    cfg, spec = app.load_study(study["cc"])
    result = run_study(cfg, spec, progress=False, log=lambda _: None)
    folder = result.out_dir.parent / "cc"
    assert sorted(p.name for p in (folder / "eval_results" / "core").iterdir()) == [
        "cc_llama-s0_eval_results.json", "cc_llama-s1_eval_results.json"]
    assert not (folder / "eval_results" / "absorption").exists()
    assert "crosscoder" in result.record["dictionaries"]["cc"]["skipped"]
    assert [r["model"] for r in result.rows] == ["llama-s0", "llama-s1"]


def test_the_subcommand_runs_the_study_and_prints_the_table(study, capsys):
    parser = argparse.ArgumentParser()
    app.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["saebench", str(study["sae"]), "--dictionary", "topk", "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| topk |" in out and "| relu |" not in out and "probing.png" in out
    args = parser.parse_args(["saebench", str(study["sae"]), "--dictionary", "nope"])
    assert args.func(args) == 2
