"""metrics.jsonl (plus wandb), and the one clear error a failed write of the run's outputs becomes.

With several processes only the main one writes the log; the others read it (`writer=False`) when a
resumed run needs what it holds, after the main one has trimmed it.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from pipeline.store import is_no_space

from .checkpoint import CheckpointError


@contextmanager
def writes(path: Path):
    """A failed write of the run's outputs (a full disk) as one clear error: the checkpoints are
    intact, so --resume continues once space is freed."""
    try:
        yield
    except OSError as e:
        why = "no space left on the device" if is_no_space(e) else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"could not write {path}: {why}. The last checkpoint is intact; free space there, "
            f"then run `mdiff train <config> --resume`.") from e


class MetricsLog:
    """metrics.jsonl, plus wandb when asked for and installed. A resumed run first drops the lines
    written after its checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None, wandb_project: str | None, run_name: str,
                 writer: bool = True):
        self.path, self.writer = path, writer
        self.kept: list[dict] = []
        self.wandb = None
        if writer:
            path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            if writer:
                self._write_all("")
        elif path.exists():
            # a line torn by a full disk or a kill mid-append is dropped with the rest after it
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if record["step"] <= resume_step:
                    self.kept.append(record)
            if writer:
                self._write_all("".join(json.dumps(r) + "\n" for r in self.kept))
        if wandb_project and writer:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_name, resume="allow")
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging to metrics.jsonl only")

    def _write_all(self, text: str) -> None:
        with writes(self.path):
            self.path.write_text(text)

    def final_validation(self, step: int) -> dict[str, dict]:
        """The validation metrics the kept lines hold for `step`, by dictionary."""
        return {r["dictionary"]: {k: v for k, v in r.items() if k.startswith("val/")}
                for r in self.kept if r["step"] == step and any(k.startswith("val/") for k in r)}

    def write(self, record: dict) -> None:
        if not self.writer:
            return
        with writes(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['dictionary']}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float))}, step=record["step"])
