"""Training loop: one pass over the store feeds every dictionary of a sweep in lockstep.

Read top to bottom: set up (arrays, loaders, dictionaries, optimizers), maybe resume, then for
each step one batch is read and every dictionary takes one Adam step on it. A sweep of six
therefore reads the data once, not six times.

Launched on several processes (`accelerate launch` / `torchrun`), the same loop trains with data
parallelism or gives each process its share of the sweep (trainer/distributed.py says how and
which); the checkpoints do not depend on the number of processes, so any number resumes them.
"""

from __future__ import annotations

import dataclasses
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
from pipeline.typed_config import ConfigError
from trainer.config import DictionarySpec, TrainSpec
from trainer.config import TrainExperiment as ExperimentConfig

from . import checkpoint as ckpt
from . import resample as R
from . import variants as V
from .architectures import ARCHITECTURES
from .dictionaries import ACTIVITY_FILE, TENSOR_TERMS, Dictionary, build_dictionary
from .distributed import BatchReduce, Distributed, local_device, reduce_terms, variance_sums
from .loader import ActivationLoader
from .metrics_log import MetricsLog, writes
from .schedules import k_at, l1_at, lr_factor
from .sharing import sharing


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
    variants: V.VariantState = field(default_factory=V.VariantState.new)  # adaptive L1, merge counts

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
        knobs["l1_coefficient"] = l1_at(step, spec.l1_coefficient, spec.l1_coefficient_start,
                                        spec.l1_schedule_steps, spec.l1_schedule_delay, spec.l1_warmup_steps)
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


def make_loader(arrays, ts, train: TrainSpec, split: str, device, rows: int | None = None,
                dist: Distributed | None = None) -> ActivationLoader:
    """The shuffled, aligned loader of one split ("train" or "validation") with `train`'s settings.
    Batches come as float32 (converted in the loader's reused buffers, or on the GPU); with `dist`,
    this process's slice of each."""
    slicing = {} if dist is None else {"rank": dist.rank, "world_size": dist.world}
    return ActivationLoader(arrays, ts, split=split, batch_size=train.batch_size, seed=train.seed,
                            buffer_tokens=train.buffer_tokens, read_threads=train.read_threads,
                            reader=train.reader, include_first_position=train.include_first_position,
                            device=device, float32=True, direct_io=train.direct_io,
                            planned_rows=planned_rows(train, split) if rows is None else rows, **slicing)


def new_member(spec: DictionarySpec, train: TrainSpec, n_models: int, d_model: int,
                scales: list[float], device) -> Member:
    """A fresh dictionary of the sweep with its Adam optimizer and zeroed dead-latent counters."""
    model = build_dictionary(spec, n_models, d_model, scales).to(device)
    base_lr = spec.lr or train.lr
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, betas=(0.9, 0.999))
    counters = torch.zeros(spec.n_latents, dtype=torch.long, device=device)
    return Member(spec, model, opt, base_lr, counters, variants=V.VariantState.new(device))


def train_step(m: Member, x: torch.Tensor, step: int, train: TrainSpec, dist: Distributed | None = None,
               variance: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """One Adam step of one member on batch `x` (scheduled lr and knobs, constraint, counters).
    With `dist` (data parallelism), `x` is this process's equal slice of the batch and `variance`
    its `variance_sums`: the gradients, counters and logged terms become the whole batch's."""
    for group in m.opt.param_groups:
        group["lr"] = m.base_lr * lr_factor(step, train.steps, train.lr_warmup_steps,
                                            train.lr_decay_fraction)
    dead = m.dead_mask(train.dead_after_tokens)
    loss, terms = m.model.loss(x, dead_mask=dead, **V.scale_knobs(m.variants, m.spec, _step_knobs(m.spec, step)))
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    if dist is not None:
        dist.average_grads_(m.model.parameters())
    m.model.remove_parallel_grads_()
    if train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), train.grad_clip)
    m.opt.step()
    m.model.constrain_()
    with torch.no_grad():
        if dist is None:
            fired, tokens = terms["fired"], x.shape[0]
        else:
            tokens = x.shape[0] * dist.world
            terms, counts = reduce_terms(terms, x.shape[0], tokens, variance, dist)
            fired = counts > 0
        m.tokens_since_fired += tokens
        m.tokens_since_fired.masked_fill_(fired, 0)  # boolean indexing would sync a GPU
    V.observe_(m.variants, m.spec, terms)
    # summed as device tensors: a .item() per term per step would stall a GPU every step
    for name in terms:  # by name: `terms["f"]` (dense codes) is built only when read
        if name not in TENSOR_TERMS:
            m.sums[name] = m.sums.get(name, 0.0) + terms[name]
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
        dead = R.resample_candidates(m.tokens_since_fired, train.dead_after_tokens,
                                     m.spec.resample_window_steps, train.batch_size)
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
        for name in terms:
            if name not in TENSOR_TERMS:
                sums[name] = sums.get(name, 0.0) + float(terms[name])
        n += 1
    model.train()
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


def save_activity(directory: Path, tokens_since_fired: torch.Tensor) -> None:
    """The dead-latent counters beside the saved dictionary (ACTIVITY_FILE), so an evaluation can
    tell latents dead by the training definition (silent for dead_after_tokens) from the others."""
    tensors = {"tokens_since_fired": tokens_since_fired.detach().to("cpu", torch.int64).contiguous()}
    atomic_write(directory / ACTIVITY_FILE, lambda p: save_file(tensors, str(p)))


def _checkpoint_parts(members: list[Member]) -> dict[str, dict]:
    parts = {}
    for m in members:
        opt_tensors, opt_meta = ckpt.optimizer_tensors(m.opt)
        parts[m.spec.name] = {
            "tensors": {"dictionary": dict(m.model.state_dict()), "optimizer": opt_tensors,
                        "counters": {"tokens_since_fired": m.tokens_since_fired},
                        "variants": m.variants.tensors(),
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
        m.variants.load_(tensors.get("variants", {}))
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
    device = local_device(M.resolve_device(cfg.train.device))
    dist = Distributed.from_env(device)
    dist.use_device(device)
    try:
        return _run(cfg, cfg.train, dist, device, resume, log if dist.is_main else (lambda *a, **k: None), progress)
    finally:
        dist.close()


def _run(cfg: ExperimentConfig, train: TrainSpec, dist: Distributed, device, resume: bool, log,
         progress: bool) -> TrainReport:
    torch.manual_seed(train.seed)
    par = sharing(train, dist, cfg.source_file or "<config>")
    progress = progress and dist.is_main
    out = Path(train.out_dir)
    root, ts, hook, names, arrays = open_arrays(cfg, train)
    d_model = arrays[0].array.shape[1]
    scales = [a.scale for a in arrays]
    loader = make_loader(arrays, ts, train, "train", device, dist=dist if par.data else None)
    val_loader = make_loader(arrays, ts, train, "validation", device) if par.evaluates else None
    members = [new_member(train.dictionaries[i], train, len(arrays), d_model, scales, device) for i in par.owned]
    index = {m.spec.name: i for m, i in zip(members, par.owned)}
    for m in members if par.data else ():
        m.model.batch_reduce = BatchReduce(dist)

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
    where = "" if dist.world == 1 else f", {dist.world} processes ({par.mode} parallel)"
    log(f"training {len(train.dictionaries)} {kind}(s) in lockstep on {hook.label} of {', '.join(names)}: "
        f"{train.steps} steps x {train.batch_size} tokens, device {device}{where}")

    # the main process trims the log of a resumed run before the others read it
    metrics = MetricsLog(out / "metrics.jsonl", resumed_from, train.wandb_project, cfg.name) if dist.is_main else None
    dist.barrier()
    metrics = metrics or MetricsLog(out / "metrics.jsonl", resumed_from, None, cfg.name, writer=False)
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

    def validate(ms: list[Member], step: int) -> None:
        own = []
        for m in ms if par.evaluates else ():
            final[m.spec.name] = evaluate(m.model, val_loader, train.eval_batches)
            own.append((index[m.spec.name], {"step": step, "dictionary": m.spec.name, **final[m.spec.name]}))
        for r in par.emit(metrics, own):
            final[r["dictionary"]] = {k: v for k, v in r.items() if k.startswith("val/")}

    for step in range(start, train.steps):
        x = next(batches).float()
        variance = variance_sums(x, dist) if par.data else None
        for m in members:
            train_step(m, x, step, train, dist if par.data else None, variance)
        resample_due(members, step, train, arrays, ts, device, progress)
        if par.data and any(m.spec.merge_every and (step + 1) % m.spec.merge_every == 0 for m in members):
            x = dist.gather(x)  # a merge draws its inputs from the whole batch
        for m in members:
            V.merge_due(m.model, m.opt, m.spec, m.tokens_since_fired, m.variants, x, step)
        done = step + 1
        bar.update(1)
        if done % train.log_every == 0 or done == train.steps:
            bar.set_postfix_str(_postfix(members))
            lines = []
            for m in members:
                n_dead = int(m.dead_mask(train.dead_after_tokens).sum())
                lines.append((index[m.spec.name], {
                    "step": done, "dictionary": m.spec.name, "tokens": done * train.batch_size,
                    "lr": m.opt.param_groups[0]["lr"], "dead": n_dead,
                    **{k: float(v) / m.n_summed for k, v in m.sums.items()},
                    **_step_knobs(m.spec, step), **V.log_fields(m.variants, m.spec)}))
                m.sums, m.n_summed = {}, 0
            par.emit(metrics, lines)
        if done % train.eval_every == 0 or done == train.steps:
            validate(members, done)
        if done % train.checkpoint_every == 0 or done == train.steps:
            par.save(out / "checkpoints", done, lambda: _checkpoint_parts(members), loader.state_dict)
    bar.close()

    if start == train.steps:  # resumed after the last checkpoint: its validation is in the log,
        final = metrics.final_validation(train.steps)  # unless a torn line lost it
        validate([m for m in members if m.spec.name not in final], train.steps)
    saves = members if dist.is_main or par.mode == "dictionaries" else []
    for m in saves:
        m.model.__dict__.pop("batch_reduce", None)
        n_dead = int(m.dead_mask(train.dead_after_tokens).sum())
        with writes(out / m.spec.name):
            m.model.save(out / m.spec.name, {**meta, "name": m.spec.name, "steps": train.steps,
                                             "dead_latents": n_dead,
                                             "final_metrics": final.get(m.spec.name, {})})
            save_activity(out / m.spec.name, m.tokens_since_fired)
    dist.barrier()  # every process's dictionaries are saved
    for spec in train.dictionaries:
        log(f"  {spec.name}: saved to {out / spec.name}  "
            + "  ".join(f"{k.removeprefix('val/')} {v:.4g}" for k, v in final.get(spec.name, {}).items()
                        if "/" not in k.removeprefix("val/")))
    return TrainReport(out, train.steps, resumed_from, final)
