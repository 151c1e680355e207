"""Training on several processes (`accelerate launch` or `torchrun`): the process group, the few
collectives the trainer needs, and the hook through which a dictionary computes its batch-level
quantities over the whole batch.

Two ways to share the work (`[train] parallel`, `choose_parallel`):

- "data": every process takes its own slice of every global batch (the loader gathers only those
  rows; the global order is the one a single process sees, so it does not depend on the number of
  processes), gradients are averaged (the loss is a mean over the batch and the slices are equal,
  so the average of the per-slice gradients is the full batch's gradient), and what depends on the
  whole batch is reduced: the dead-latent counts, AuxK's normalisation, BatchTopK's batch-level
  top-k and its learned threshold, and every logged term (`reduce_terms`).
- "dictionaries": every process trains its share of the sweep on the full batches; nothing is
  exchanged per step but the log lines.

One process is world 1: every collective is a no-op and nothing is imported or initialised, so the
default path is unchanged. A collective that fails (another process died or was killed) or waits
longer than the timeout (MDIFF_COLLECTIVE_TIMEOUT_S, default 600 s; gloo and NCCL honour it) raises
`DistributedError`, which names the way back: `--resume` with any number of processes.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable

import torch
from torch import Tensor

TIMEOUT_ENV = "MDIFF_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
EPS = 1e-12
# what `Dictionary.loss` returns beside its scalar terms (trainer.dictionary.TENSOR_TERMS)
_TENSOR_TERMS = ("f", "counts", "fired")


class DistributedError(RuntimeError):
    """A collective failed: another training process stopped, or the group timed out."""


def _lost(what: str, rank: int, exc: BaseException) -> DistributedError:
    cause = " ".join(str(exc).split())[:300]
    return DistributedError(
        f"training process {rank} lost the others during {what} (one of them stopped, was killed, or "
        f"did not answer within the collective timeout; {type(exc).__name__}: {cause}). The last "
        "checkpoint is intact: run `mdiff train <config> --resume`, with one process or several.")


class Distributed:
    """The process group of one training job; world 1 (the default) does nothing at all."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, group_owner: bool = False):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.is_main = rank == 0
        self._owner = group_owner
        self._device_hint = torch.device("cpu")  # where collective buffers live (NCCL: the GPU)

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Distributed:
        """The group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
        environment: accelerate launch and torchrun both set them); world 1 without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        owner = False
        if not dist.is_initialized():
            raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
            try:
                seconds = float(raw)
            except ValueError:
                raise DistributedError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; "
                                       "unset it or use e.g. 600") from None
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(device)
            try:
                dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
            except Exception as e:  # noqa: BLE001 - a rendezvous that never completes
                raise _lost("start-up", rank, e) from e
            owner = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owner)

    # ------------------------------------------------------------------ collectives
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - gloo / NCCL raise RuntimeError subclasses of all kinds
            raise _lost(what, self.rank, e) from e

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            # an all-reduce rather than dist.barrier(): NCCL's barrier guesses the device
            self._call("a barrier", dist.all_reduce, torch.zeros(1, device=self._device_hint))

    def use_device(self, device: torch.device) -> None:
        """Where this process's collective buffers live (NCCL needs them on the GPU)."""
        self._device_hint = device

    def sum_(self, t: Tensor) -> Tensor:
        """In place: the sum over the processes."""
        if self.world > 1:
            import torch.distributed as dist

            self._call("an all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def min_(self, t: Tensor) -> Tensor:
        if self.world > 1:
            import torch.distributed as dist

            self._call("an all-reduce", dist.all_reduce, t, op=dist.ReduceOp.MIN)
        return t

    def gather(self, t: Tensor) -> Tensor:
        """Every process's `t` (the same shape everywhere), concatenated along dim 0 in rank order."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        self._call("an all-gather", dist.all_gather, out, t.contiguous())
        return torch.cat(out)

    def gather_json(self, obj) -> list:
        """Every process's JSON-able `obj`, in rank order (as UTF-8 bytes in tensors: no pickle)."""
        if self.world == 1:
            return [obj]
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=self._device_hint)
        size = torch.tensor([data.numel()], device=self._device_hint)
        sizes = self.gather(size).tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8, device=self._device_hint)
        padded[:data.numel()] = data
        rows = self.gather(padded[None]).cpu()
        return [json.loads(bytes(rows[r, :n].tolist()).decode()) for r, n in enumerate(sizes)]

    def average_grads_(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Each gradient becomes its mean over the processes, in one all-reduce. A parameter that has
        a gradient on any process gets one everywhere (zeros where it had none), so the optimizer
        steps the same parameters on every process."""
        if self.world == 1:
            return
        params = list(params)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        self.sum_(has)
        for p, n in zip(params, has.tolist()):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.sum_(flat).div_(self.world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def close(self) -> None:
        if self._owner:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owner = False


class BatchReduce:
    """What a dictionary needs to see the whole batch while it holds one equal slice of it: set as
    `dictionary.batch_reduce` by the data-parallel trainer (None, the default, is one process)."""

    def __init__(self, dist: Distributed):
        self.dist = dist
        self.world_size, self.rank = dist.world, dist.rank

    def gather(self, t: Tensor) -> Tensor:
        return self.dist.gather(t)

    def min(self, t: Tensor) -> Tensor:
        return self.dist.min_(t.clone())

    def variance_sum(self, e: Tensor) -> Tensor:
        """sum over the whole batch of (e - mean_b e)^2, e [slice, ...] (the batch mean, not the slice's)."""
        n = torch.tensor([float(e.shape[0])], device=e.device, dtype=e.dtype)
        total = self.dist.sum_(torch.cat([e.sum(0).reshape(-1), n]))
        mean = (total[:-1] / total[-1]).view_as(e[0])
        return self.dist.sum_((e - mean).pow(2).sum().reshape(1)).reshape(())


def local_device(device: torch.device) -> torch.device:
    """This process's GPU when the launcher started one per GPU ("cuda" becomes cuda:LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def choose_parallel(parallel: str, n_dictionaries: int, world: int) -> str:
    """"data" or "dictionaries" for `[train] parallel`. "auto" takes "dictionaries" when the sweep
    has at least as many members as there are processes: each then trains whole dictionaries on
    full batches with no per-step gradient exchange (the cheapest way to use the processes, at most
    one dictionary of imbalance); with fewer members some processes would idle, so "data" splits
    every batch instead."""
    if parallel != "auto":
        return parallel
    return "dictionaries" if n_dictionaries >= world else "data"


def variance_sums(x: Tensor, dist: Distributed) -> tuple[Tensor, Tensor]:
    """Per model: (this slice's sum of squared deviations from its own mean, as `Dictionary.loss`
    computes it; the whole batch's from the whole batch's mean), x [slice, n_models, d_model]."""
    local = (x - x.mean(0)).pow(2).sum((0, 2))
    n = torch.tensor([float(x.shape[0])], device=x.device)
    total = dist.sum_(torch.cat([x.sum(0).reshape(-1), n]))
    mean = (total[:-1] / total[-1]).view_as(x[0])
    return local, dist.sum_((x - mean).pow(2).sum((0, 2)))


def reduce_terms(terms, n_local: int, n_global: int, variance: tuple[Tensor, Tensor],
                 dist: Distributed) -> tuple[dict[str, Tensor], Tensor]:
    """(the whole batch's scalar terms, its per-latent firing counts) from one slice's `terms` of
    `Dictionary.loss`, in one all-reduce. Means over the batch are weighted by the slices' sizes;
    FVUs are ratios of sums, so they are rebuilt from each slice's error sums and the whole batch's
    variance (`variance_sums`)."""
    local_var, global_var = variance
    names = [k for k in terms if k not in _TENSOR_TERMS and k != "fvu" and not k.startswith("fvu/")]
    n_models = local_var.numel()
    per_model = torch.stack([terms[f"fvu/{i}"].to(torch.float32) for i in range(n_models)])
    err = per_model * local_var.clamp_min(EPS)
    means = torch.stack([terms[k].to(torch.float32) for k in names]) if names else err.new_zeros(0)
    counts = terms["counts"].to(torch.float32)
    packed = dist.sum_(torch.cat([means * (n_local / n_global), err, counts]))
    reduced = dict(zip(names, packed[:len(names)]))
    err = packed[len(names):len(names) + n_models]
    reduced["fvu"] = err.sum() / global_var.sum().clamp_min(EPS)
    for i in range(n_models):
        reduced[f"fvu/{i}"] = err[i] / global_var[i].clamp_min(EPS)
    # in the order of `terms`, as one process logs them
    return {k: reduced[k] for k in terms if k in reduced}, packed[len(names) + n_models:]
