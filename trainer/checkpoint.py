"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder written under a temporary name and renamed into place, and `latest.json`
is replaced (atomically too) only after that, so a run killed while checkpointing resumes from the
previous one; a write that fails (a full disk) removes its temporary folder and says so, and the
previous checkpoint stays the one `--resume` takes.

A checkpoint holds the whole run whatever the number of processes that wrote it (one part per
dictionary, the full batch position, the full counters), so any number can resume from it. When
processes train different dictionaries, the others stage their parts (`stage_parts`) beside the
checkpoints and the main process moves them into the checkpoint it writes (`staged=True`): the
folders must be on a file system all of them see.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.records import atomic_write, atomic_write_text
from pipeline.store import human_bytes, is_no_space

_STEP_DIR = re.compile(r"step_[0-9]{9}")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact and still the latest."""


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Adam's state as flat tensors plus the JSON-able param groups."""
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def _write_parts(where: Path, parts: dict[str, dict]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        d = where / name
        d.mkdir(parents=True)
        for stem, tensors in part["tensors"].items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(d / f"{stem}.safetensors"))
        (d / "state.json").write_text(json.dumps(part["json"], indent=1))


def _staged(directory: Path, step: int) -> list[Path]:
    return sorted(directory.glob(f".staged_step_{step:09d}_rank*"))


def stage_parts(directory: Path, step: int, rank: int, parts: dict[str, dict]) -> None:
    """Another process's parts of checkpoint `step`, for the main process's `save_checkpoint(...,
    staged=True)` to move in."""
    directory.mkdir(parents=True, exist_ok=True)
    where = directory / f".staged_step_{step:09d}_rank{rank}"
    shutil.rmtree(where, ignore_errors=True)
    try:
        where.mkdir()
        _write_parts(where, parts)
    except Exception as e:
        shutil.rmtree(where, ignore_errors=True)
        raise _write_error(directory, step, parts, e) from e


def save_checkpoint(directory: Path, step: int, parts: dict[str, dict], state: dict,
                    keep: int = 2, staged: bool = False) -> Path:
    """`parts`: name -> {"tensors": {file stem: {key: tensor}}, "json": {...}}; with `staged`,
    plus the parts other processes staged for this step."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    stale_staged = [p for p in directory.glob(".staged_step_*") if p not in _staged(directory, step)]
    for stale in (*directory.glob(".*.partial"), *directory.glob(".tmp_step_*"), *stale_staged):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)

    def write(tmp: Path) -> None:
        _write_parts(tmp, parts)
        for folder in _staged(directory, step) if staged else ():
            for d in folder.iterdir():
                shutil.move(str(d), str(tmp / d.name))
        # written last: a folder without it was never finished
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)  # only now: a failed write leaves it alone

    try:  # a failed write removes its temporary folder (the space comes back)
        atomic_write(final, write)
        atomic_write_text(directory / "latest.json", json.dumps({"step": step, "path": final.name}))
    except Exception as e:
        raise _write_error(directory, step, parts, e) from e
    for folder in _staged(directory, step) if staged else ():
        shutil.rmtree(folder, ignore_errors=True)
    old = sorted(p for p in directory.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def _write_error(directory: Path, step: int, parts: dict, exc: Exception) -> CheckpointError:
    size = sum(t.numel() * t.element_size() for part in parts.values()
               for tensors in part["tensors"].values() for t in tensors.values())
    previous = latest_checkpoint(directory)
    kept = (f"the previous checkpoint ({previous.name}) is intact and still the one --resume takes"
            if previous is not None else "there is no earlier checkpoint")
    why = "no space left on the device" if is_no_space(exc) else "the write failed"
    cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return CheckpointError(
        f"could not write checkpoint step {step} under {directory}: {why} ({cause}). A checkpoint "
        f"needs about {human_bytes(size)}; {kept}. Free space there, then run "
        f"`mdiff train <config> --resume`.")


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint `latest.json` names; if that is unreadable or gone, the newest finished
    one (a step folder exists only once renamed into place whole)."""
    try:
        name = json.loads((directory / "latest.json").read_text())["path"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if (isinstance(name, str) and _STEP_DIR.fullmatch(name)
            and (directory / name / "trainer_state.json").is_file()):
        return directory / name
    finished = sorted(p for p in directory.glob("step_*")
                      if _STEP_DIR.fullmatch(p.name) and (p / "trainer_state.json").is_file())
    return finished[-1] if finished else None


def load_part(checkpoint: Path, name: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    d = checkpoint / name
    tensors = {p.stem: load_file(str(p)) for p in d.glob("*.safetensors")}
    return tensors, json.loads((d / "state.json").read_text())


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())
