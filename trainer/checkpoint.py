"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder written under a temporary name and renamed into place, and `latest.json`
is replaced only after that, so a run killed while checkpointing resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


def save_checkpoint(directory: Path, step: int, parts: dict[str, dict], state: dict,
                    keep: int = 2) -> Path:
    """`parts`: name -> {"tensors": {file stem: {key: tensor}}, "json": {...}}."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    tmp = directory / f".tmp_step_{step:09d}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, part in parts.items():
        d = tmp / name
        d.mkdir(parents=True)
        for stem, tensors in part["tensors"].items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(d / f"{stem}.safetensors"))
        (d / "state.json").write_text(json.dumps(part["json"], indent=1))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest = directory / "latest.json"
    latest_tmp = directory / "latest.json.tmp"
    latest_tmp.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(latest_tmp, latest)
    old = sorted(p for p in directory.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    latest = directory / "latest.json"
    if not latest.exists():
        return None
    path = directory / json.loads(latest.read_text())["path"]
    return path if path.exists() else None


def load_part(checkpoint: Path, name: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    d = checkpoint / name
    tensors = {p.stem: load_file(str(p)) for p in d.glob("*.safetensors")}
    return tensors, json.loads((d / "state.json").read_text())


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())
