"""Shared pieces of the reliability tests: one tiny fixture and one reference store per session,
store snapshots, and the environment for subprocesses.

The reference store is what an undisturbed job writes; every fault test ends by comparing its
store (or training output) with it byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mdiff.config import load_config
from mdiff.tiny import build_fixture, train_section, write_config
from pipeline.cache import run_cache

REPO = Path(__file__).resolve().parents[2]
N_TOKENS = 2048  # 128 sequences of 16: 8 shards of 256 rows per array, chunks of 64 rows
HOOKS = ((1, "resid_post"), (2, "resid_pre"))
BTK = {"name": "btk", "architecture": "batchtopk", "n_latents": 64, "k": 4}
RELU = {"name": "relu", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.1, "l1_warmup_steps": 5}


@dataclass
class Kit:
    dir: Path
    fx: dict
    ref_store: Path  # the complete reference store: 2 models x 2 hooks

    def config(self, path: Path, *, store: Path | str, models=("llama-s0", "llama-s1"), hooks=HOOKS,
               train: dict | None = None, name: str = "exp", **kw) -> Path:
        return write_config(path, self.fx, models=models, store=str(store), n_tokens=N_TOKENS,
                            hooks=hooks, train=train, name=name, **kw)

    def store_copy(self, dest: Path) -> Path:
        shutil.copytree(self.ref_store, dest)
        return dest


@pytest.fixture(scope="session")
def kit(tmp_path_factory) -> Kit:
    d = tmp_path_factory.mktemp("reliability")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=300, d_model=32, n_layers=3)
    ref = d / "ref-store"
    cfg = write_config(d / "ref.toml", fx, store=str(ref), n_tokens=N_TOKENS, hooks=HOOKS)
    run_cache(load_config(cfg), log=lambda *a: None, progress=False)
    return Kit(d, fx, ref)


def train_sweep(steps: int = 40, checkpoint_every: int = 10, dictionaries=(BTK, RELU),
                models=("llama-s0", "llama-s1"), **kw) -> dict:
    """A [train] section (as write_config data) for a lockstep sweep over the kit's models."""
    return train_section(list(models), list(dictionaries), steps=steps, checkpoint_every=checkpoint_every,
                         batch_size=128, eval_every=20, **kw)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders): equal snapshots mean nothing was
    written, renamed or removed."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def data_files(root: Path) -> dict[str, bytes]:
    """The chunk and shard files of a store (what the tokens and activations are), by path."""
    return {k: v for k, v in snapshot(root).items()
            if v is not None and "/c/" in f"/{k}" and ".partial" not in k}


def reference_files(kit: Kit, model: str = "llama-s0", hook: str = "layer1.resid_post") -> dict[str, bytes]:
    """The reference store's token set and the data files of one of its arrays: what a job
    caching only that model and hook writes."""
    return {k: v for k, v in data_files(kit.ref_store).items()
            if k.startswith("tokensets/") or f"/{model}-" in f"/{k}" and f"/{hook}/" in k}


def subprocess_env() -> dict[str, str]:
    """Offline, with the repository importable; torch keeps the thread count of this process so
    that a subprocess computes the same floats as the test itself."""
    import torch

    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("WORLD_SIZE", None)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mdiff.cli", *args]


class Forkserver:
    """A process that imports torch, transformers, zarr and mdiff once, then forks one child per
    `mdiff` command: each child is a separate process running the real CLI (killable with
    SIGKILL) without paying the imports again (~3.5 s of CPU each).

    Started under `unshare -Urm` where that works, so that `sh("mount", ...)` mounts privately
    for its children (a size-limited tmpfs: a disk that really fills up).
    """

    def __init__(self):
        code = "from tests.reliability import fault_kit; fault_kit._forkserver_main()"
        env = {**subprocess_env(), "PYTHONPATH": str(REPO)}
        self.private_mounts = _unshare_works()
        prefix = ["unshare", "-Urm"] if self.private_mounts else []
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", code], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forkserver died (exit status {self.proc.wait()})")
        return json.loads(line)

    def start(self, *args: str, log: Path) -> int:
        """`mdiff *args` in a new child, stdout and stderr to `log`; returns its pid."""
        return self._ask(run=list(args), log=str(log))["pid"]

    def wait(self, pid: int, block: bool = True) -> int | None:
        """The child's exit status (negative: killed by that signal); None if still running."""
        return self._ask(wait=pid, block=block)["rc"]

    def run(self, *args: str, log: Path) -> int:
        return self.wait(self.start(*args, log=log))

    def sh(self, *cmd: str) -> None:
        """A command inside the forkserver's mount namespace (mount, cp out of a tmpfs, ...)."""
        reply = self._ask(sh=list(cmd))
        assert reply["rc"] == 0, (cmd, reply)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _forkserver_main() -> None:
    import traceback

    import torch  # noqa: F401 - the expensive imports, done once before any fork
    import transformers.models.llama.modeling_llama  # noqa: F401
    import zarr  # noqa: F401

    import evals.run  # noqa: F401
    import mdiff.cli
    import pipeline.cache  # noqa: F401
    import trainer.train  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        if "run" in req:
            pid = os.fork()
            if pid == 0:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                try:
                    rc = mdiff.cli.main(req["run"])
                except BaseException:  # noqa: BLE001 - a traceback in the log is the test's evidence
                    traceback.print_exc()
                    rc = 3
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
            reply = {"pid": pid}
        elif "wait" in req:
            done, status = os.waitpid(req["wait"], 0 if req["block"] else os.WNOHANG)
            reply = {"rc": os.waitstatus_to_exitcode(status) if done else None}
        else:
            r = subprocess.run(req["sh"], capture_output=True, text=True)
            reply = {"rc": r.returncode, "stderr": r.stderr}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _unshare_works() -> bool:
    """Whether this user may mount a tmpfs in a private mount namespace."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            probe = ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d]
            return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


@pytest.fixture(scope="session")
def forkserver():
    server = Forkserver()
    yield server
    server.close()
