"""Training loop: one pass over the store feeds every dictionary of a sweep in lockstep.

Read top to bottom: set up (arrays, loaders, dictionaries, optimizers), maybe resume, then for
each step one batch is read and every dictionary takes one Adam step on it. A sweep of six
therefore reads the data once, not six times.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline import experiment as E
from pipeline import models as M
from pipeline import store as S
from pipeline.config_files import dump_config
from pipeline.records import atomic_write
from pipeline.store import is_no_space
from pipeline.typed_config import ConfigError
from trainer.config import DictionarySpec, TrainSpec
from trainer.config import TrainExperiment as ExperimentConfig

from . import checkpoint as ckpt
from . import resample as R
from .architectures import ARCHITECTURES
from .dictionaries import ACTIVITY_FILE, TENSOR_TERMS, Dictionary, build_dictionary
from .loader import ActivationLoader
from .schedules import k_at, lr_factor, ramp


@dataclass
class Member:
    """One dictionary of the sweep with its optimizer and dead-latent counters."""

    spec: DictionarySpec
    model: Dictionary
    opt: torch.optim.Optimizer
    base_lr: float
    tokens_since_fired: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)
    n_summed: int = 0

    def dead_mask(self, dead_after: int) -> torch.Tensor:
        return self.tokens_since_fired >= dead_after


@dataclass
class TrainReport:
    out_dir: Path
    steps: int
    resumed_from: int | None
    dictionaries: dict[str, dict]  # name -> final validation metrics


def _step_knobs(spec: DictionarySpec, step: int) -> dict:
    """This step's scheduled values of what the architecture reads (its traits say which)."""
    arch = ARCHITECTURES[spec.architecture]
    knobs = {}
    if arch.uses_k:
        knobs["k"] = k_at(step, spec.k, spec.k_start, spec.k_schedule_steps, spec.k_schedule_delay)
    if arch.l1_penalty:
        knobs["l1_coefficient"] = ramp(step, spec.l1_warmup_steps, 0.0, spec.l1_coefficient)
    return knobs


def open_arrays(cfg: ExperimentConfig, train: TrainSpec):
    """(store root, token set, hook, model names, arrays) of the models `train` reads."""
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=False)
    ref = E.resolve_token_set(cfg)
    ts = E.open_token_set(root, cfg, ref.id)
    if ts.context_length < 2 and not train.include_first_position:
        raise ConfigError(cfg.source_file or "<config>", [(
            f"train.include_first_position: token set {ts.id} holds sequences of length 1 (an imported "
            "cache without fixed-length sequences), so every row is a position 0, which training "
            "skips by default (set train.include_first_position = true)")])
    hook = E.hook_by_label(cfg, train.hook)
    names = train.models or [m.name for m in cfg.models]
    arrays = [E.find_array(root, ref.id, cfg.model(n), hook, cfg.source_file) for n in names]
    return root, ts, hook, names, arrays


def planned_rows(train: TrainSpec, split: str) -> int:
    """Rows a run reads from `split`: the loader reads around the page cache when they are a single pass."""
    if split == "train":
        return train.steps * train.batch_size
    return train.eval_batches * train.batch_size * (train.steps // train.eval_every + 1)


def make_loader(arrays, ts, train: TrainSpec, split: str, device, rows: int | None = None) -> ActivationLoader:
    """The shuffled, aligned loader of one split ("train" or "validation") with `train`'s settings.
    Batches come as float32 (converted in the loader's reused buffers, or on the GPU)."""
    return ActivationLoader(arrays, ts, split=split, batch_size=train.batch_size, seed=train.seed,
                            buffer_tokens=train.buffer_tokens, read_threads=train.read_threads,
                            reader=train.reader, include_first_position=train.include_first_position,
                            device=device, float32=True, direct_io=train.direct_io,
                            planned_rows=planned_rows(train, split) if rows is None else rows)


def new_member(spec: DictionarySpec, train: TrainSpec, n_models: int, d_model: int,
                scales: list[float], device) -> Member:
    """A fresh dictionary of the sweep with its Adam optimizer and zeroed dead-latent counters."""
    model = build_dictionary(spec, n_models, d_model, scales).to(device)
    base_lr = spec.lr or train.lr
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, betas=(0.9, 0.999))
    counters = torch.zeros(spec.n_latents, dtype=torch.long, device=device)
    return Member(spec, model, opt, base_lr, counters)


def train_step(m: Member, x: torch.Tensor, step: int, train: TrainSpec) -> None:
    """One Adam step of one member on batch `x` (scheduled lr and knobs, constraint, counters)."""
    for group in m.opt.param_groups:
        group["lr"] = m.base_lr * lr_factor(step, train.steps, train.lr_warmup_steps,
                                            train.lr_decay_fraction)
    dead = m.dead_mask(train.dead_after_tokens)
    loss, terms = m.model.loss(x, dead_mask=dead, **_step_knobs(m.spec, step))
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    m.model.remove_parallel_grads_()
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), train.grad_clip)
    m.opt.step()
    m.model.constrain_()
    with torch.no_grad():
        fired = terms["fired"]
        m.tokens_since_fired += x.shape[0]
        m.tokens_since_fired.masked_fill_(fired, 0)  # boolean indexing would sync a GPU
    # summed as device tensors: a .item() per term per step would stall a GPU every step
    for name, value in terms.items():
        if name not in TENSOR_TERMS:
            m.sums[name] = m.sums.get(name, 0.0) + value
    m.n_summed += 1


def resample_due(members: list[Member], step: int, train: TrainSpec, arrays, ts, device,
                 progress: bool = True) -> dict[str, int]:
    """After step `step`: resample the dead latents of the members whose `resample_dead_every`
    falls due (trainer/resample.py), from one pass over a sample of the training split that all
    of them share. The sample comes from a loader of its own, seeded by the step, so the training
    batches are untouched and a resumed run resamples identically. Returns name -> latents resampled."""
    due, owners = [], []
    for m in members:
        every = m.spec.resample_dead_every
        if not every or (step + 1) % every:
            continue
        dead = m.dead_mask(train.dead_after_tokens)
        if bool(dead.any()):
            gen = torch.Generator().manual_seed(R.derived_seed("resample-pick", m.spec.seed, step))
            due.append(R.Due(m.model, m.opt, dead, m.spec.resample_sample_tokens, gen))
            owners.append(m)
    if not due:
        return {}
    tokens = max(d.sample_tokens for d in due)
    sample = dataclasses.replace(train, seed=R.derived_seed("resample-sample", train.seed, step),
                                 buffer_tokens=min(train.buffer_tokens, tokens))
    with make_loader(arrays, ts, sample, "train", device, rows=tokens) as loader:
        resampled = R.resample(due, iter(loader), limit=loader.rows_per_epoch, progress=progress)
    for m, idx in zip(owners, resampled):
        m.tokens_since_fired[idx] = 0
    return {m.spec.name: idx.numel() for m, idx in zip(owners, resampled)}


@torch.no_grad()
def evaluate(model: Dictionary, loader: ActivationLoader, n_batches: int) -> dict[str, float]:
    """Validation metrics with inference semantics (BatchTopK uses its learned threshold)."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        _, terms = model.loss(batch.float())
        for name, value in terms.items():
            if name not in TENSOR_TERMS:
                sums[name] = sums.get(name, 0.0) + float(value)
        n += 1
    model.train()
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


class _MetricsLog:
    """metrics.jsonl, plus wandb when asked for and installed. A resumed run first drops the lines
    written after its checkpoint, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None, wandb_project: str | None, run_name: str):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict] = []
        if resume_step is None:
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
            self._write_all("".join(json.dumps(r) + "\n" for r in self.kept))
        self.wandb = None
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_name, resume="allow")
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging to metrics.jsonl only")

    def _write_all(self, text: str) -> None:
        with _writes(self.path):
            self.path.write_text(text)

    def final_validation(self, step: int) -> dict[str, dict]:
        """The validation metrics the kept lines hold for `step`, by dictionary."""
        return {r["dictionary"]: {k: v for k, v in r.items() if k.startswith("val/")}
                for r in self.kept if r["step"] == step and any(k.startswith("val/") for k in r)}

    def write(self, record: dict) -> None:
        with _writes(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record['dictionary']}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float))}, step=record["step"])


def save_activity(directory: Path, tokens_since_fired: torch.Tensor) -> None:
    """The dead-latent counters beside the saved dictionary (ACTIVITY_FILE), so an evaluation can
    tell latents dead by the training definition (silent for dead_after_tokens) from the others."""
    tensors = {"tokens_since_fired": tokens_since_fired.detach().to("cpu", torch.int64).contiguous()}
    atomic_write(directory / ACTIVITY_FILE, lambda p: save_file(tensors, str(p)))


@contextmanager
def _writes(path: Path):
    """A failed write of the run's outputs (a full disk) as one clear error: the checkpoints are
    intact, so --resume continues once space is freed."""
    try:
        yield
    except OSError as e:
        why = "no space left on the device" if is_no_space(e) else f"{type(e).__name__}: {e}"
        raise ckpt.CheckpointError(
            f"could not write {path}: {why}. The last checkpoint is intact; free space there, "
            f"then run `mdiff train <config> --resume`.") from e


def _checkpoint_parts(members: list[Member]) -> dict[str, dict]:
    parts = {}
    for m in members:
        opt_tensors, opt_meta = ckpt.optimizer_tensors(m.opt)
        parts[m.spec.name] = {
            "tensors": {"dictionary": dict(m.model.state_dict()), "optimizer": opt_tensors,
                        "counters": {"tokens_since_fired": m.tokens_since_fired},
                        # the running sums of the log line in progress: a run resumed between
                        # two log lines then logs the same means as an uninterrupted one
                        "sums": {k: torch.as_tensor(v).reshape(1) for k, v in m.sums.items()}},
            "json": {"optimizer": opt_meta, "n_summed": m.n_summed},
        }
    return parts


def _restore(members: list[Member], checkpoint: Path, device) -> None:
    for m in members:
        tensors, meta = ckpt.load_part(checkpoint, m.spec.name)
        m.model.load_state_dict(tensors["dictionary"])
        ckpt.load_optimizer(m.opt, {k: v.to(device) for k, v in tensors["optimizer"].items()},
                            meta["optimizer"])
        m.tokens_since_fired.copy_(tensors["counters"]["tokens_since_fired"].to(device))
        m.sums = {k: v.to(device).reshape(()) for k, v in tensors.get("sums", {}).items()}
        m.n_summed = int(meta.get("n_summed", 0))


def _postfix(members: list[Member]) -> str:
    parts = []
    for m in members[:3]:
        n = max(m.n_summed, 1)
        parts.append(f"{m.spec.name}: fvu {float(m.sums.get('fvu', 0)) / n:.3f} "
                     f"L0 {float(m.sums.get('l0', 0)) / n:.1f}")
    return " | ".join(parts) + (" | ..." if len(members) > 3 else "")


def run_train(cfg: ExperimentConfig, resume: bool = False, log=print, progress: bool = True
              ) -> TrainReport:
    if cfg.train is None:
        raise ConfigError(cfg.source_file or "<config>",
                          ["train: missing (add a [train] section with at least one "
                           "[[train.dictionaries]] entry; see README)"])
    train = cfg.train
    torch.manual_seed(train.seed)
    device = M.resolve_device(train.device)
    out = Path(train.out_dir)
    root, ts, hook, names, arrays = open_arrays(cfg, train)
    d_model = arrays[0].array.shape[1]
    scales = [a.scale for a in arrays]
    loader = make_loader(arrays, ts, train, "train", device)
    val_loader = make_loader(arrays, ts, train, "validation", device)
    members = [new_member(s, train, len(arrays), d_model, scales, device) for s in train.dictionaries]

    start, resumed_from = 0, None
    checkpoint = ckpt.latest_checkpoint(out / "checkpoints") if resume else None
    if resume and checkpoint is None:
        log(f"--resume: no checkpoint under {out / 'checkpoints'}; starting from step 0")
    if checkpoint is not None:
        state = ckpt.trainer_state(checkpoint)
        _restore(members, checkpoint, device)
        loader.load_state_dict(state["loader"])
        start = resumed_from = state["step"]
        log(f"resuming from {checkpoint} (step {start} of {train.steps})")
    kind = "SAE" if len(arrays) == 1 else f"{len(arrays)}-model crosscoder"
    log(f"training {len(members)} {kind}(s) in lockstep on {hook.label} of {', '.join(names)}: "
        f"{train.steps} steps x {train.batch_size} tokens, device {device}")

    metrics = _MetricsLog(out / "metrics.jsonl", resumed_from, train.wandb_project, cfg.name)
    meta = {
        "experiment": cfg.name, "store": root.url, "tokenset_id": ts.id, "hook": hook.label,
        "models": names, "model_keys": [a.attrs["model_key"] for a in arrays],
        "arrays": [a.path for a in arrays],
        "train": dump_config(cfg)["train"],
    }
    batches = iter(loader)
    bar = tqdm(total=train.steps, initial=start, unit="step", disable=not progress,
               dynamic_ncols=True, desc="train")
    final: dict[str, dict] = {}
    for step in range(start, train.steps):
        x = next(batches).float()
        for m in members:
            train_step(m, x, step, train)
        resample_due(members, step, train, arrays, ts, device, progress)
        done = step + 1
        bar.update(1)
        if done % train.log_every == 0 or done == train.steps:
            bar.set_postfix_str(_postfix(members))
            for m in members:
                n_dead = int(m.dead_mask(train.dead_after_tokens).sum())
                record = {"step": done, "dictionary": m.spec.name, "tokens": done * train.batch_size,
                          "lr": m.opt.param_groups[0]["lr"], "dead": n_dead,
                          **{k: float(v) / m.n_summed for k, v in m.sums.items()},
                          **_step_knobs(m.spec, step)}
                metrics.write(record)
                m.sums, m.n_summed = {}, 0
        if done % train.eval_every == 0 or done == train.steps:
            for m in members:
                val = evaluate(m.model, val_loader, train.eval_batches)
                metrics.write({"step": done, "dictionary": m.spec.name, **val})
                final[m.spec.name] = val
        if done % train.checkpoint_every == 0 or done == train.steps:
            ckpt.save_checkpoint(out / "checkpoints", done, _checkpoint_parts(members),
                                 {"loader": loader.state_dict()})
    bar.close()

    if start == train.steps:  # resumed after the last checkpoint: its validation is in the log,
        final = metrics.final_validation(train.steps)  # unless a torn line lost it
        for m in members:
            if m.spec.name not in final:
                final[m.spec.name] = evaluate(m.model, val_loader, train.eval_batches)
                metrics.write({"step": train.steps, "dictionary": m.spec.name, **final[m.spec.name]})
    for m in members:
        n_dead = int(m.dead_mask(train.dead_after_tokens).sum())
        with _writes(out / m.spec.name):
            m.model.save(out / m.spec.name, {**meta, "name": m.spec.name, "steps": train.steps,
                                             "dead_latents": n_dead,
                                             "final_metrics": final.get(m.spec.name, {})})
            save_activity(out / m.spec.name, m.tokens_since_fired)
        log(f"  {m.spec.name}: saved to {out / m.spec.name}  "
            + "  ".join(f"{k.removeprefix('val/')} {v:.4g}" for k, v in final.get(m.spec.name, {}).items()
                        if "/" not in k.removeprefix("val/")))
    return TrainReport(out, train.steps, resumed_from, final)

