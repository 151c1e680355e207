"""How the processes of one training run share it: which dictionaries each trains, whether each
holds a slice of every batch, and how the log lines and checkpoints of all of them reach the one
metrics.jsonl and the one checkpoint the main process writes (trainer/distributed.py has the
collectives and the rule for `[train] parallel = "auto"`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.typed_config import ConfigError
from trainer.config import TrainSpec

from . import checkpoint as ckpt
from .distributed import Distributed, choose_parallel
from .metrics_log import MetricsLog


@dataclass
class Sharing:
    """How this process shares the run: its members (indices into the sweep), whether it holds a
    slice of each batch, and the collectives."""

    dist: Distributed
    mode: str  # "single", "data" or "dictionaries"
    owned: list[int]

    @property
    def data(self) -> bool:
        return self.mode == "data"

    @property
    def evaluates(self) -> bool:
        """Validation batches are few: in data mode the main process evaluates them whole."""
        return not self.data or self.dist.is_main

    def emit(self, metrics: MetricsLog, entries: list[tuple[int, dict]]) -> list[dict]:
        """Log lines (sweep index, record) of this process's members; in "dictionaries" mode every
        process's, in sweep order, as one process writes them. Returns the records logged."""
        if self.mode == "dictionaries":
            entries = sorted((tuple(e) for part in self.dist.gather_json(entries) for e in part),
                             key=lambda e: e[0])
        for _, record in entries:
            metrics.write(record)
        return [record for _, record in entries]

    def save(self, directory: Path, step: int, parts: Callable[[], dict], loader_state: Callable[[], dict]) -> None:
        """The checkpoint of the whole run (`parts()` of this process's members): the main process
        writes it; in "dictionaries" mode the others first stage their members' parts for it."""
        parts = parts() if self.dist.is_main or self.mode == "dictionaries" else {}
        if self.mode == "dictionaries":
            if not self.dist.is_main:
                ckpt.stage_parts(directory, step, self.dist.rank, parts)
            self.dist.barrier()
        if self.dist.is_main:
            ckpt.save_checkpoint(directory, step, parts, {"loader": loader_state()},
                                 staged=self.mode == "dictionaries")


def sharing(train: TrainSpec, dist: Distributed, source: str) -> Sharing:
    n = len(train.dictionaries)
    if dist.world == 1:
        return Sharing(dist, "single", list(range(n)))
    mode = choose_parallel(train.parallel, n, dist.world)
    if mode == "data" and train.batch_size % dist.world:
        lower = train.batch_size - train.batch_size % dist.world
        raise ConfigError(source, [
            f"train.batch_size: {train.batch_size} tokens do not split into {dist.world} equal slices "
            f"(data parallelism over {dist.world} processes); use a multiple of {dist.world}, e.g. "
            f"{max(lower, dist.world)}, or train.parallel = \"dictionaries\""])
    owned = list(range(n)) if mode == "data" else list(range(dist.rank, n, dist.world))
    return Sharing(dist, mode, owned)
