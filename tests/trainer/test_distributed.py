"""Training on two CPU processes (gloo) against one process on a tiny store: data parallelism and
dictionaries split across processes give the same dictionaries and metrics.jsonl as one process, a
killed process stops the other with a clear error, and a checkpoint resumes on another number of
processes to where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mdiff.config import load_config
from mdiff.tiny import train_section as tiny_train_section
from mdiff.tiny import write_config
from pipeline.typed_config import ConfigError
from tests.support import cache_tiny_store, interrupt_training_at
from trainer import train as T
from trainer.config import DictionarySpec, TrainSpec
from trainer.distributed import BatchReduce, Distributed, choose_parallel
from trainer.sharing import sharing

REPO = Path(__file__).resolve().parents[2]
# a 2-model crosscoder sweep of every architecture that reduces over the batch: per-token TopK with
# AuxK (dead latents appear after 8 steps), BatchTopK (batch-level top-k and threshold), ReLU with
# resampling; 120 steps: long enough for a kill to land mid-run
CROSS = [{"name": "topk", "architecture": "topk", "n_latents": 64, "k": 4, "k_start": 8, "k_schedule_steps": 20},
         {"name": "btk", "architecture": "batchtopk", "n_latents": 64, "k": 4},
         {"name": "relu", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.1,
          "resample_dead_every": 50}]
SAES = [{"name": "btk", "architecture": "batchtopk", "n_latents": 64, "k": 4},
        {"name": "topk", "architecture": "topk", "n_latents": 64, "k": 4},
        {"name": "relu", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.1}]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return cache_tiny_store(tmp_path_factory.mktemp("dist"), n_docs=300, n_layers=2, n_tokens=4096)


def config(cached, name, models, dictionaries, parallel="auto", steps=120) -> Path:
    d, fx = cached
    train = tiny_train_section(models, dictionaries, steps=steps, checkpoint_every=20, batch_size=128,
                               extra={"parallel": parallel, "eval_every": 40})
    return write_config(d / f"{name}.toml", fx, n_tokens=4096, hooks=((1, "resid_post"),),
                        store=str(d / "store"), name=name, train=train)


def one_process(cfg_path: Path, resume: bool = False) -> Path:
    return T.run_train(load_config(cfg_path), resume=resume, log=lambda *a: None, progress=False).out_dir


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return {**env, **extra}


def _train(cfg: Path, *more: str) -> list[str]:
    return ["-m", "mdiff.cli", "train", str(cfg), "--no-progress", *more]


def accelerate(cfg: Path, *more: str) -> None:
    """What the README says to run: --multi_gpu is accelerate's "N local processes", gloo on a CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_port()), *_train(cfg, *more)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def torchrun(cfg: Path, *more: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_port()), *_train(cfg, *more)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_same_run(out: Path, ref: Path, names) -> None:
    for name in names:
        got, want = load_file(str(out / name / "dictionary.safetensors")), load_file(str(ref / name / "dictionary.safetensors"))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-5, msg=f"{name} {key}")
        counters = [load_file(str(d / name / "latent_activity.safetensors"))["tokens_since_fired"] for d in (out, ref)]
        assert torch.equal(*counters), name
    lines = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, ref)]
    assert [(r["step"], r["dictionary"], sorted(r)) for r in lines[0]] == \
        [(r["step"], r["dictionary"], sorted(r)) for r in lines[1]]
    for got, want in zip(*lines):
        for key, value in want.items():
            expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-6)
            assert got[key] == expected, (want["step"], want["dictionary"], key)


def test_rule_and_world_one_collectives():
    assert choose_parallel("auto", 3, 2) == "dictionaries" and choose_parallel("auto", 1, 2) == "data"
    assert choose_parallel("data", 8, 2) == "data"
    one = Distributed()
    t = torch.arange(6.0).reshape(3, 2)
    assert one.gather(t) is t and one.gather_json({"a": 1}) == [{"a": 1}]
    # one slice that is the whole batch: the batch's own variance
    e = torch.randn(5, 2, 3)
    torch.testing.assert_close(BatchReduce(one).variance_sum(e), (e - e.mean(0)).pow(2).sum())


def test_who_trains_what_and_unequal_slices_are_refused():
    specs = [DictionarySpec(name=f"d{i}", architecture="topk", n_latents=8, k=2) for i in range(3)]
    train = TrainSpec(dictionaries=specs, batch_size=127)
    assert sharing(train, Distributed(1, 2), "exp.toml").owned == [1]  # auto: dictionaries 0, 2 | 1
    with pytest.raises(ConfigError, match=r"batch_size: 127 .* multiple of 2, e.g. 126"):
        sharing(TrainSpec(dictionaries=specs[:1], batch_size=127), Distributed(0, 2), "exp.toml")
    data = sharing(TrainSpec(dictionaries=specs, batch_size=128, parallel="data"), Distributed(1, 2), "exp.toml")
    assert data.owned == [0, 1, 2] and data.data and not data.evaluates


def test_data_parallel_crosscoders_equal_one_process_and_resume_from_one_on_two(cached, tmp_path):
    models = ["llama-s0", "llama-s1"]
    ref = one_process(config(cached, "ref", models, CROSS))
    two = config(cached, "two", models, CROSS, parallel="data")
    accelerate(two)
    assert_same_run(ref.parent / "two", ref, [d["name"] for d in CROSS])

    # started on one process, stopped after its checkpoint at step 60, resumed on two
    part = config(cached, "part", models, CROSS, parallel="data")
    with pytest.MonkeyPatch.context() as mp:
        interrupt_training_at(mp, 70, _Stop)
        with pytest.raises(_Stop):
            one_process(part)
    out = ref.parent / "part"
    assert not (out / "relu").exists() and max(json.loads(x)["step"] for x in (out / "metrics.jsonl").open()) == 70
    torchrun(part, "--resume")
    assert_same_run(out, ref, [d["name"] for d in CROSS])


class _Stop(Exception):
    pass


def test_dictionaries_split_across_processes_equal_one_process(cached):
    ref = one_process(config(cached, "saes", ["llama-s0"], SAES, steps=40))
    accelerate(config(cached, "saes2", ["llama-s0"], SAES, parallel="dictionaries", steps=40))
    assert_same_run(ref.parent / "saes2", ref, [d["name"] for d in SAES])
    assert not list((ref.parent / "saes2" / "checkpoints").glob(".staged*"))


def test_killed_process_stops_the_other_and_resume_on_one_ends_where_uninterrupted(cached):
    models = ["llama-s0", "llama-s1"]
    ref_dir = cached[0] / "runs" / "ref"
    if not (ref_dir / "relu").exists():
        one_process(config(cached, "ref", models, CROSS))
    cfg = config(cached, "killed", models, CROSS, parallel="data")
    out = cached[0] / "runs" / "killed"
    port = _port()
    procs = [subprocess.Popen([sys.executable, *_train(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                  MDIFF_COLLECTIVE_TIMEOUT_S="20"))
             for r in range(2)]
    deadline = time.monotonic() + 120
    while procs[1].poll() is None and time.monotonic() < deadline:
        if (out / "checkpoints" / "step_000000020").is_dir():
            procs[1].send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    procs[1].wait()
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 3, err[-2000:]
    assert time.monotonic() - t0 < 30
    assert "lost the others" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "relu").exists()  # it stopped mid-run
    one_process(cfg, resume=True)
    assert_same_run(out, ref_dir, [d["name"] for d in CROSS])
