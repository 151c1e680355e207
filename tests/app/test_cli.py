"""The whole pipeline through the command line, as `make smoke` runs it, on a tiny experiment."""

import json
from html.parser import HTMLParser

from mdiff.cli import main as cli_main
from mdiff.tiny import build_fixture, smoke_sections, write_config


def test_cache_train_eval_report(tmp_path, capsys):
    fx = build_fixture(tmp_path, archs=("llama",), seeds=(0, 1), n_docs=600, d_model=32, n_layers=3)
    train = smoke_sections(steps=40, eval_every=20, checkpoint_every=20, batch_size=256)
    cfg = write_config(tmp_path / "exp.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),),
                       name="cli", train=train)
    for cmd in (["cache"], ["train"], ["eval"], ["report"]):
        assert cli_main([*cmd, str(cfg), *(["--no-progress"] if cmd != ["report"] else [])]) == 0
    out = capsys.readouterr().out
    assert "| cli | llama-s0 vs. llama-s1 |" in out and "report.tex" in out
    ev = tmp_path / "train" / "eval"
    for name in ("batchtopk-k8", "relu-l1"):
        splice = json.loads((ev / name / "splice.json").read_text())
        assert set(splice["metrics"]["per_model"]) == {"llama-s0", "llama-s1"}
        assert (ev / name / "relative_norms.png").stat().st_size > 0
        HTMLParser().feed((ev / name / "latents.html").read_text())
    assert (tmp_path / "train" / "report" / "report.md").exists()
    # a second eval on a config without [train] is refused with a clear message, no traceback
    bare = write_config(tmp_path / "bare.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),))
    assert cli_main(["eval", str(bare)]) == 2
    assert "train: missing" in capsys.readouterr().err


def test_smoke_hands_every_stage_the_arguments_it_reads(tmp_path, monkeypatch):
    """`mdiff smoke` runs the four stage commands with one namespace: each must find its options
    there (eval's --dictionary was once missing, so `make smoke` stopped after training)."""
    import mdiff.cli as cli
    import mdiff.tiny as tiny

    seen = []
    monkeypatch.setattr(tiny, "build_fixture", lambda directory, **kw: {})
    monkeypatch.setattr(tiny, "write_smoke_config", lambda directory, fx: directory / "exp.toml")
    monkeypatch.setattr(cli, "cmd_cache", lambda args: seen.append("cache") or 0)
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.append("train") or 0)
    monkeypatch.setattr(cli, "cmd_report", lambda args: seen.append("report") or 0)
    monkeypatch.setattr("mdiff.config.load_config", lambda path: path)  # the real cmd_eval runs
    monkeypatch.setattr("evals.run.run_eval", lambda cfg, **kw: seen.append(("eval", kw["dict_dirs"])))
    args = cli.build_parser().parse_args(["smoke", str(tmp_path), "--no-progress"])
    assert cli.cmd_smoke(args) == 0
    assert seen == ["cache", "train", ("eval", None), "report"]
