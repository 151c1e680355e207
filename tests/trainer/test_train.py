"""Stage two end to end on a tiny cached store: lockstep sweeps, outputs, resume, folding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdiff.config import load_config
from mdiff.tiny import train_section as tiny_train_section
from mdiff.tiny import write_config
from pipeline import store as S
from tests.support import cache_tiny_store, interrupt_training_at
from trainer import checkpoint as ckpt
from trainer import train as T
from trainer.dictionaries import Dictionary, load_dictionary

ACTIVITY_FILE = "latent_activity.safetensors"  # the name trainer.trained reads


def train_section(models, dictionaries, steps=60, checkpoint_every=20, batch=256):
    return tiny_train_section(models, dictionaries, steps=steps, checkpoint_every=checkpoint_every,
                              batch_size=batch)


BTK = {"name": "btk", "architecture": "batchtopk", "n_latents": 128, "k": 4}
RELU = {"name": "relu", "architecture": "relu", "n_latents": 128, "l1_coefficient": 0.1, "l1_warmup_steps": 10,
        "resample_dead_every": 25}
TOPK = {"name": "topk", "architecture": "topk", "n_latents": 64, "k": 4, "k_start": 16, "k_schedule_steps": 30}
JUMP = {"name": "jump", "architecture": "jumprelu", "n_latents": 64, "l0_coefficient": 0.01}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One cached store with three tiny models, shared by the tests (training only reads it)."""
    return cache_tiny_store(tmp_path_factory.mktemp("train"), seeds=(0, 1, 2))


def config_with(cached, name, train) -> Path:
    d, fx = cached
    return write_config(d / f"{name}.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),),
                        store=str(d / "store"), name=name, train=train)


def records(out: Path, name: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["dictionary"] == name]


def test_lockstep_sweep_of_saes_trains_and_saves(cached):
    cfg = load_config(config_with(cached, "saes", train_section(["llama-s0"], [BTK, RELU, TOPK, JUMP])))
    report = T.run_train(cfg, log=lambda *a: None, progress=False)
    out = report.out_dir
    for name in ("btk", "relu", "topk", "jump"):
        meta = json.loads((out / name / "config.json").read_text())
        assert meta["n_models"] == 1 and meta["models"] == ["llama-s0"]
        assert meta["tokenset_id"].startswith("ts-") and len(meta["scales"]) == 1
        assert sorted(p.name for p in (out / name).iterdir()) == [
            "config.json", "dictionary.safetensors", "latent_activity.safetensors"]
        train_lines = [r for r in records(out, name) if "fvu" in r]
        assert train_lines[-1]["fvu"] < 0.8 * train_lines[0]["fvu"], name
        assert "val/fvu" in records(out, name)[-1]
    # the logged loss is the objective: mse plus the weighted penalty (constant weights here)
    for name, coefficient, term in (("btk", 1 / 32, "aux"), ("topk", 1 / 32, "aux"),
                                    ("jump", 0.01, "l0_penalty")):
        for r in (r for r in records(out, name) if "mse" in r):
            assert r["loss"] == pytest.approx(r["mse"] + coefficient * r[term], rel=1e-5), name
    # the k schedule moved from 16 to 4
    ks = [r["k"] for r in records(out, "topk") if "k" in r]
    assert ks[0] > ks[-1] == 4
    # JumpReLU kept its decoder rows at unit norm through training
    torch.testing.assert_close(load_dictionary(out / "jump").decoder_norms(), torch.ones(64, 1))


def test_latent_activity_is_saved_with_each_dictionary(cached, monkeypatch):
    """tokens_since_fired beside the weights: the trainer's own counters after the last step, from
    which the dead latents recorded in config.json and the log follow."""
    cfg = load_config(config_with(cached, "activity", train_section(["llama-s0"], [BTK, RELU, JUMP], steps=30,
                                                                    checkpoint_every=30)))
    fired = {}  # per dictionary: the last step each latent fired at, replayed from the loss terms
    real_loss = Dictionary.loss

    def loss(self, x, **kwargs):
        out = real_loss(self, x, **kwargs)
        if self.training:
            last = fired.setdefault(self.spec.name, torch.full((self.n_latents,), -1))
            step = fired.setdefault(self.spec.name + "/steps", [0])
            last[out[1]["fired"]] = step[0]
            step[0] += 1
        return out

    monkeypatch.setattr(Dictionary, "loss", loss)
    report = T.run_train(cfg, log=lambda *a: None, progress=False)
    out, batch, steps = report.out_dir, cfg.train.batch_size, cfg.train.steps
    checkpoint = ckpt.latest_checkpoint(out / "checkpoints")
    for name in ("btk", "relu", "jump"):
        saved = load_file(str(out / name / ACTIVITY_FILE))
        assert list(saved) == ["tokens_since_fired"]
        counters = saved["tokens_since_fired"]
        assert counters.dtype == torch.int64 and counters.shape == (load_dictionary(out / name).n_latents,)
        assert torch.equal(counters, ckpt.load_part(checkpoint, name)[0]["counters"]["tokens_since_fired"])
        if name != "relu":  # (relu resamples, which restarts counters: the replay would not know)
            expected = (steps - 1 - fired[name]) * batch
            assert torch.equal(counters, expected), name
        dead = int((counters >= cfg.train.dead_after_tokens).sum())
        assert json.loads((out / name / "config.json").read_text())["dead_latents"] == dead
        assert [r for r in records(out, name) if "dead" in r][-1]["dead"] == dead


def test_three_model_crosscoders_train(cached):
    cfg = load_config(config_with(cached, "cc3", train_section(["llama-s0", "llama-s1", "llama-s2"],
                                                               [BTK, RELU])))
    report = T.run_train(cfg, log=lambda *a: None, progress=False)
    for name in ("btk", "relu"):
        d = load_dictionary(report.out_dir / name)
        assert d.W_dec.shape[1] == 3
        lines = [r for r in records(report.out_dir, name) if "fvu" in r]
        assert lines[-1]["fvu"] < 0.8 * lines[0]["fvu"]
        assert {"fvu/0", "fvu/1", "fvu/2"} <= set(lines[-1])


def test_resume_is_bit_identical(cached, monkeypatch):
    # checkpoints between log lines (every 15 steps, logs every 10): the resumed run must carry
    # the running sums of the unfinished log line
    sweep = train_section(["llama-s0", "llama-s1"], [BTK, RELU], checkpoint_every=15)
    full = T.run_train(load_config(config_with(cached, "full", sweep)), log=lambda *a: None,
                       progress=False)

    cfg = load_config(config_with(cached, "cut", sweep))
    real_step = interrupt_training_at(monkeypatch, 47)  # dies at step 48 (1-based), after checkpoint 45
    with pytest.raises(KeyboardInterrupt):
        T.run_train(cfg, log=lambda *a: None, progress=False)
    monkeypatch.setattr(T, "train_step", real_step)
    resumed = T.run_train(cfg, resume=True, log=lambda *a: None, progress=False)
    assert resumed.resumed_from == 45
    for name in ("btk", "relu"):
        for file in ("dictionary.safetensors", ACTIVITY_FILE):
            a = load_file(str(full.out_dir / name / file))
            b = load_file(str(resumed.out_dir / name / file))
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a), (name, file)
    assert [r for r in map(json.loads, (full.out_dir / "metrics.jsonl").read_text().splitlines())] == \
           [r for r in map(json.loads, (resumed.out_dir / "metrics.jsonl").read_text().splitlines())]


def test_resume_after_the_last_checkpoint_with_a_torn_log_line(cached):
    """Killed after the final checkpoint, mid-append to metrics.jsonl, before the dictionaries
    were saved: --resume writes the same dictionaries, final metrics and log."""
    cfg = load_config(config_with(cached, "torn", train_section(["llama-s0"], [BTK, TOPK], steps=20)))
    full = T.run_train(cfg, log=lambda *a: None, progress=False)
    log_file = full.out_dir / "metrics.jsonl"
    complete = log_file.read_text()
    saved = {n: (full.out_dir / n / "config.json").read_text() for n in ("btk", "topk")}
    activity = {n: (full.out_dir / n / ACTIVITY_FILE).read_bytes() for n in saved}
    for n in saved:
        (full.out_dir / n / "config.json").unlink()
        (full.out_dir / n / ACTIVITY_FILE).unlink()
    log_file.write_text(complete[: len(complete) - 40])  # the last validation line, torn
    resumed = T.run_train(cfg, resume=True, log=lambda *a: None, progress=False)
    assert resumed.resumed_from == 20
    assert log_file.read_text() == complete
    for n, text in saved.items():
        assert json.loads((full.out_dir / n / "config.json").read_text()) == json.loads(text)
        assert (full.out_dir / n / ACTIVITY_FILE).read_bytes() == activity[n]


def test_folded_dictionary_works_on_raw_activations(cached):
    cfg = load_config(config_with(cached, "fold", train_section(["llama-s0", "llama-s1"], [BTK],
                                                                steps=20)))
    report = T.run_train(cfg, log=lambda *a: None, progress=False)
    d = load_dictionary(report.out_dir / "btk").eval()
    meta = json.loads((report.out_dir / "btk" / "config.json").read_text())
    root = S.StoreRoot(meta["store"])
    normed = torch.stack([S.read_rows(S.open_activation_array(root, p), 16, 528).float()
                          for p in meta["arrays"]], dim=1)
    scales = torch.tensor(meta["scales"])
    raw = normed / scales[None, :, None]
    folded = d.fold_scales(meta["scales"]).eval()
    expected = d(normed)[0] / scales[None, :, None]
    torch.testing.assert_close(folded(raw)[0], expected, rtol=1e-4, atol=1e-5)


def test_training_before_caching_names_the_command(tmp_path, cached):
    _, fx = cached
    cfg = write_config(tmp_path / "nocache.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),),
                       store=str(tmp_path / "empty"), train=train_section(["llama-s0"], [BTK]))
    with pytest.raises(S.IncompleteError, match="mdiff cache"):
        T.run_train(load_config(cfg), log=lambda *a: None, progress=False)
