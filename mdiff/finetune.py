"""A deterministic, resumable causal-LM fine-tune: the "narrowly fine-tuned model" of a model diff.

Model-diffing methods are easiest to judge on a pair where we know what changed: a base model and
a copy fine-tuned for a few minutes on one domain. Everything here is a function of the settings:
batch `s` is drawn from a generator seeded with (seed, s), the learning rate is a function of the
step, so a run killed at any point and started again resumes from its last checkpoint (weights and
AdamW moments in safetensors) and ends with the same weights as an uninterrupted run.

A fine-tune on one text alone is not narrow: it moves the residual stream almost as much on every
other text (measured on SmolLM2: relative change 0.39 on held-out Bible text, 0.34 on Austen),
and a model diff then has nothing domain-specific to find. An optional *anchor* makes the change
narrow by construction: on windows of a general text, the residual at one layer is held to the
base model's by a penalty, `anchor_weight * sum ||h_tuned - h_base||^2 / sum ||h_base||^2`
(position 0 skipped: its massive activation would dominate the sum). What changed is then known:
the model's computation on the fine-tuning domain, not elsewhere.

The result is a Hugging Face directory keyed by its inputs (base model, texts, settings, library
versions; see `mdiff.prepare`), so a second run finds it instead of training again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mdiff import prepare as P
from pipeline.config import HookSpec
from pipeline.hooks import capture, decoder_layers
from pipeline.records import sha256_file
from trainer import checkpoint as ckpt
from trainer.schedules import lr_factor


@dataclass(frozen=True)
class FinetuneSpec:
    steps: int = 150
    lr: float = 1e-4
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    batch_size: int = 8  # sequences per step
    seq_len: int = 64  # tokens per sequence
    train_layers: int | None = None  # train decoder layers [first_layer, train_layers) only; None: every weight
    first_layer: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    bf16_autocast: bool = False  # bfloat16 autocast: faster only on CPUs with bfloat16 units (AVX-512
    # BF16, AMX) or GPUs; on AVX2-only CPUs its matmuls ran 25x slower than float32 here
    seed: int = 0
    checkpoint_every: int = 25
    anchor_weight: float = 0.0  # > 0: hold the residual at resid_post of `anchor_layer` on the anchor text
    anchor_layer: int | None = None
    anchor_batch_size: int = 4  # anchor windows per step, of seq_len tokens

    def __post_init__(self):
        positive = ("steps", "lr", "batch_size", "seq_len", "checkpoint_every")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"FinetuneSpec.{name} = {getattr(self, name)!r}: must be > 0")
        for name in ("warmup_steps", "grad_clip", "weight_decay", "seed", "first_layer", "anchor_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"FinetuneSpec.{name} = {getattr(self, name)!r}: must be >= 0")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"FinetuneSpec.decay_fraction = {self.decay_fraction!r}: use a fraction in [0, 1]")
        if self.train_layers is not None and self.train_layers < 1:
            raise ValueError(f"FinetuneSpec.train_layers = {self.train_layers!r}: train at least one "
                             "layer, or None for every weight")
        if self.first_layer and (self.train_layers is None or self.first_layer >= self.train_layers):
            raise ValueError(f"FinetuneSpec.first_layer = {self.first_layer} needs train_layers above it "
                             f"(got {self.train_layers!r}): layers [first_layer, train_layers) are trained")
        if self.anchor_weight > 0 and (self.anchor_layer is None or self.anchor_layer < 0):
            raise ValueError(f"FinetuneSpec.anchor_weight = {self.anchor_weight} needs anchor_layer, the "
                             f"layer whose resid_post is held to the base model's (got {self.anchor_layer!r})")
        if self.anchor_batch_size < 1:
            raise ValueError(f"FinetuneSpec.anchor_batch_size = {self.anchor_batch_size!r}: must be >= 1")


# ------------------------------------------------------------------------------------ data


def token_stream(tokenizer, text_path: str | Path) -> torch.Tensor:
    """The text's paragraphs (blank-line separated) tokenized and joined, each followed by EOS."""
    paragraphs = [p.strip() for p in Path(text_path).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if not paragraphs:
        raise ValueError(f"{text_path} holds no text to fine-tune on")
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return torch.tensor([t for doc in ids for t in doc + eos], dtype=torch.long)


def _random_windows(stream: torch.Tensor, n: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """[n, seq_len] windows of the stream at offsets drawn from a generator seeded with `seed`."""
    span = stream.numel() - seq_len
    if span <= 0:
        raise ValueError(f"{what} has {stream.numel()} tokens, fewer than seq_len {seq_len} + 1")
    starts = torch.randint(0, span, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def batch_at(stream: torch.Tensor, step: int, spec: FinetuneSpec) -> torch.Tensor:
    """[batch_size, seq_len] windows of the stream at random offsets: a function of (seed, step)."""
    return _random_windows(stream, spec.batch_size, spec.seq_len, spec.seed * 1_000_003 + step, "the text")


def anchor_batch(stream: torch.Tensor, step: int, spec: FinetuneSpec) -> torch.Tensor:
    """[anchor_batch_size, seq_len] windows of the anchor text: a function of (seed, step), drawn
    from a generator of its own so the training batches are the same with or without an anchor."""
    return _random_windows(stream, spec.anchor_batch_size, spec.seq_len,
                           spec.seed * 1_000_003 + step + 7_919 * 1_000_000, "the anchor text")


def relative_move(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean over tokens of ||after - before|| / ||before|| ([..., d_model] activations).

    Not a ratio of totals: SmolLM2 has massive activations (norm ~3,000 against a mean of ~140) on
    a few tokens, and one of them in a sample decides a total (0.24 on Austen where the tokens'
    mean is 0.055)."""
    moved = (after - before).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-12)
    return float(moved.mean())


def anchor_penalty(model, base, x: torch.Tensor, layer: int) -> torch.Tensor:
    """sum ||h_model - h_base||^2 / sum ||h_base||^2 at resid_post of `layer`, position 0 skipped;
    both forwards stop at that layer."""
    hook = [HookSpec(layer, "resid_post")]
    with torch.no_grad():
        ref = capture(base, x, hook)[hook[0]][:, 1:]
    got = capture(model, x, hook, detach=False)[hook[0]][:, 1:]
    return (got - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-12)


def heldout_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """`n` evenly spaced windows: a fixed sample for before/after loss comparisons."""
    span = stream.numel() - seq_len
    if span <= 0:
        raise ValueError(f"{stream.numel()} tokens are fewer than one window of {seq_len}")
    starts = torch.linspace(0, span, n).long()
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) over the windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, windows.shape[0], batch_size):
        x = windows[lo:lo + batch_size]
        out = model(input_ids=x, labels=x, use_cache=False)
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------ training


def trainable_parameters(model, spec: FinetuneSpec) -> dict[str, torch.nn.Parameter]:
    """The weights this fine-tune changes, by name; all others are frozen."""
    if spec.train_layers is None:
        return dict(model.named_parameters())
    layers = decoder_layers(model)
    if spec.train_layers > len(layers):
        raise ValueError(f"FinetuneSpec.train_layers = {spec.train_layers}, but the model has {len(layers)} "
                         "decoder layers")
    wanted = {id(p) for layer in layers[spec.first_layer:spec.train_layers] for p in layer.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels for the duration of the fine-tune only; the caller's setting returns."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def finetune_inputs(base_dir: Path, text_path: Path, spec: FinetuneSpec, anchor_text: Path | None = None) -> dict:
    """What the fine-tuned weights depend on. A prepared base is named by its recorded key (its
    own inputs); any other directory by the hash of its weights."""
    base = P.recorded_key(base_dir) or sha256_file(base_dir / "model.safetensors")
    inputs = {"what": "causal-lm-finetune", "base": base, "text": text_path.name,
              "text_sha256": sha256_file(text_path), "spec": dataclasses.asdict(spec),
              "libraries": P.library_versions("torch", "transformers")}
    if spec.anchor_weight > 0:
        inputs["anchor_text"] = [Path(anchor_text).name, sha256_file(Path(anchor_text))]
    return inputs


def finetune(base_dir: str | Path, text_path: str | Path, parent: str | Path, name: str,
             spec: FinetuneSpec = FinetuneSpec(), *, anchor_text: str | Path | None = None, log=print,
             progress: bool = True) -> Path:
    """Fine-tune the model in `base_dir` on `text_path`; returns the keyed output directory.
    With `spec.anchor_weight` > 0, `anchor_text` is the general text whose residual is held fixed.

    Reuses a finished output; resumes an interrupted one from `<output>.work/checkpoints`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, text_path = Path(base_dir), Path(text_path)
    if spec.anchor_weight > 0 and anchor_text is None:
        raise ValueError(f"FinetuneSpec.anchor_weight = {spec.anchor_weight} but no anchor_text was given: pass "
                         "the general text whose residual the fine-tune must leave unchanged, or set it to 0")
    inputs = finetune_inputs(base_dir, text_path, spec, None if anchor_text is None else Path(anchor_text))
    final = P.artifact_dir(parent, name, inputs)
    if P.is_prepared(final, inputs):
        log(f"{name}: reusing {final}")
        return final
    work = final.with_name(final.name + ".work")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.train()
    params = trainable_parameters(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=spec.lr, weight_decay=spec.weight_decay)
    stream = token_stream(tokenizer, text_path)
    anchored = spec.anchor_weight > 0
    if anchored:
        if spec.anchor_layer >= len(decoder_layers(model)):
            raise ValueError(f"FinetuneSpec.anchor_layer = {spec.anchor_layer}, but the model has "
                             f"{len(decoder_layers(model))} decoder layers")
        reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        reference.requires_grad_(False)
        anchor_stream = token_stream(tokenizer, anchor_text)

    start, losses, anchors = 0, [], []
    last = ckpt.latest_checkpoint(work / "checkpoints")
    if last is not None:
        tensors, meta = ckpt.load_part(last, "finetune")
        with torch.no_grad():
            for n, t in tensors["weights"].items():
                params[n].copy_(t)
        ckpt.load_optimizer(opt, tensors["optimizer"], meta["optimizer"])
        state = ckpt.trainer_state(last)
        start, losses, anchors = state["step"], state["losses"], state.get("anchor", [])
        log(f"{name}: resuming the fine-tune from step {start} ({last})")
    n_params = sum(p.numel() for p in params.values())
    log(f"{name}: fine-tuning {n_params / 1e6:.1f}M parameters on {text_path.name} ({stream.numel():,} tokens): "
        f"{spec.steps} steps x {spec.batch_size} x {spec.seq_len} tokens, lr {spec.lr}"
        + (f"; residual at layer {spec.anchor_layer} held on {Path(anchor_text).name} (weight {spec.anchor_weight})"
           if anchored else ""))

    bar = tqdm(total=spec.steps, initial=start, unit="step", desc="fine-tune", disable=not progress,
               dynamic_ncols=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16_autocast)
    with _deterministic():
        for step in range(start, spec.steps):
            for group in opt.param_groups:
                group["lr"] = spec.lr * lr_factor(step, spec.steps, spec.warmup_steps, spec.decay_fraction)
            x = batch_at(stream, step, spec)
            with autocast:
                loss = model(input_ids=x, labels=x, use_cache=False).loss
                penalty = (anchor_penalty(model, reference, anchor_batch(anchor_stream, step, spec),
                                          spec.anchor_layer) if anchored else None)
            (loss if penalty is None else loss + spec.anchor_weight * penalty).backward()
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
            if penalty is not None:
                anchors.append(round(float(penalty.detach()), 6))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", **({"anchor": f"{anchors[-1]:.4f}"} if anchors else {}))
            done = step + 1
            if done % spec.checkpoint_every == 0 and done < spec.steps:
                opt_tensors, opt_meta = ckpt.optimizer_tensors(opt)
                ckpt.save_checkpoint(work / "checkpoints", done, {"finetune": {
                    "tensors": {"weights": dict(params), "optimizer": opt_tensors},
                    "json": {"optimizer": opt_meta}}}, {"losses": losses, "anchor": anchors})
    bar.close()

    model.eval()
    out = P.publish(final, inputs, lambda tmp: P.save_pretrained(tmp, model, tokenizer),
                    {"train_losses": losses, **({"anchor_penalties": anchors} if anchors else {})})
    shutil.rmtree(work, ignore_errors=True)
    return out
