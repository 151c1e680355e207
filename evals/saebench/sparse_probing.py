"""Sparse probing (SAEBench `evals/sparse_probing`): how well k latents, picked by the gap between
the class means, classify texts, against the model's own residual dimensions.

Each text is cut to `context_length` tokens after the tokenizer's BOS and run once through the
model; its activation is the mean over its tokens with BOS (position 0), EOS and padding left
out, in the store's normalized units. An SAE's code for the text is the mean of its codes of
those same tokens (encode each token, then pool, as SAEBench does).

Per dataset every class gives a one-vs-rest task (a two-class dataset one task), each side of
equal size, negatives drawn evenly from the other classes, in the training and the test split.
For each task and k, the k dimensions (or latents) with the largest |mean_pos - mean_neg| on the
training texts feed an L2 logistic regression (C = 1, run to convergence); the score is test
accuracy. `llm_*` uses the residual stream (top k dimensions, and all of them), `sae_*` the
latents (top k, and all of them). Scores average over a dataset's tasks, then over datasets.

SAEBench fits its all-dimensions probes with Adam and keeps the epoch with the best *test*
accuracy; here every probe is the same converged C = 1 regression, selected on nothing held out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from evals.saebench.capture import hook_batches, pad_id, padded, with_bos
from evals.saebench.config import ProbingSpec
from evals.saebench.datasets import Split
from evals.saebench.logistic import accuracy, fit_logistic, logits
from evals.saebench.view import SaeView
from pipeline.config import HookSpec


@dataclass
class Pooled:
    """A dataset's texts in order (train then test, class by class) and their pooled features."""

    labels: list[str]
    test: Tensor  # [n] bool
    model: Tensor  # [n, d_model]
    codes: dict[str, Tensor]  # SAE name -> [n, n_latents]


def texts_of(split: Split) -> tuple[list[str], list[str], list[bool]]:
    texts, labels, test = [], [], []
    for is_test, part in ((False, split.train), (True, split.test)):
        for label, items in part.items():
            texts += items
            labels += [label] * len(items)
            test += [is_test] * len(items)
    return texts, labels, test


def pool(model, tokenizer, split: Split, hook: HookSpec, scale: float, saes: Mapping[str, SaeView],
         spec: ProbingSpec, progress: bool = False) -> Pooled:
    """One forward pass over the dataset's texts; mean-pooled activations and codes of every SAE."""
    texts, labels, test = texts_of(split)
    encoded = tokenizer(texts, add_special_tokens=False).input_ids
    seqs = [with_bos(tokenizer, ids)[:spec.context_length] for ids in encoded]
    skip = torch.as_tensor([t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                            if t is not None], dtype=torch.long)
    pad = pad_id(tokenizer)
    model_out: Tensor | None = None
    codes: dict[str, Tensor] = {}
    for idx, h, mask in hook_batches(model, seqs, hook, scale, pad=pad, batch_size=spec.batch_size,
                                     progress=progress, desc=f"probing texts {split.name}"):
        ids, _ = padded([seqs[i] for i in idx], pad)
        keep = mask.bool() & ~torch.isin(ids, skip).to(mask.device)
        keep[:, 0] = False
        counts = keep.sum(1, keepdim=True).clamp_min(1).float()
        pooled = (h * keep[..., None]).sum(1) / counts
        rows = torch.as_tensor(idx)
        if model_out is None:
            model_out = torch.zeros(len(seqs), h.shape[-1])
        model_out[rows] = pooled.cpu()
        flat = h[keep]  # the kept tokens, [t, d]
        owner = keep.nonzero()[:, 0]
        for name, view in saes.items():
            f = view.codes(flat)
            sums = torch.zeros(len(idx), f.shape[1], device=f.device).index_add_(0, owner.to(f.device), f)
            if name not in codes:
                codes[name] = torch.zeros(len(seqs), f.shape[1])
            codes[name][rows] = (sums / counts.to(f.device)).cpu()
    assert model_out is not None
    return Pooled(labels, torch.as_tensor(test), model_out, codes)


def tasks(pooled: Pooled, seed: int) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """class -> (train rows, train labels, test rows, test labels): each side balanced, negatives
    drawn evenly from the other classes (SAEBench's prepare_probe_data)."""
    classes = list(dict.fromkeys(pooled.labels))
    label = torch.as_tensor([classes.index(c) for c in pooled.labels])
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes[:1] if len(classes) == 2 else classes:
        ci = classes.index(c)
        parts = []
        for is_test in (False, True):
            in_split = pooled.test == is_test
            pos = torch.nonzero(in_split & (label == ci))[:, 0]
            others = [torch.nonzero(in_split & (label == j))[:, 0] for j in range(len(classes)) if j != ci]
            per_class = math.ceil(len(pos) / len(others))
            neg = torch.cat([o[torch.randperm(len(o), generator=gen)[:per_class]] for o in others])
            neg = neg[torch.randperm(len(neg), generator=gen)[:len(pos)]]
            pos = pos[:len(neg)]  # too few negatives: as many positives as there are
            rows = torch.cat([pos, neg])
            parts += [rows, torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])]
        out[c] = tuple(parts)
    return out


def top_k_by_mean_gap(x: Tensor, y: Tensor, k: int) -> Tensor:
    """The k columns of x with the largest |mean over y=1 - mean over y=0| (ties: lower index)."""
    gap = (x[y > 0].mean(0) - x[y == 0].mean(0)).abs()
    return torch.sort(gap, descending=True, stable=True).indices[:k]


def probe_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    weight, bias = fit_logistic(x_train, y_train[:, None], l2=1.0)
    return float(accuracy(y_test[:, None], logits(x_test.to(weight), weight, bias))[0])


def probe_features(features: Tensor, task_rows: tuple[Tensor, Tensor, Tensor, Tensor], ks: Sequence[int],
                   prefix: str) -> dict[str, float]:
    """{prefix}_test_accuracy (all columns) and {prefix}_top_{k}_test_accuracy for one task."""
    train_rows, y_train, test_rows, y_test = task_rows
    x_train, x_test = features[train_rows].double(), features[test_rows].double()
    out = {f"{prefix}_test_accuracy": probe_accuracy(x_train, y_train, x_test, y_test)}
    for k in ks:
        cols = top_k_by_mean_gap(x_train, y_train, min(k, x_train.shape[1]))
        out[f"{prefix}_top_{k}_test_accuracy"] = probe_accuracy(x_train[:, cols], y_train, x_test[:, cols], y_test)
    return out


def average(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} if rows else {}


def probe_dataset(features: Tensor, pooled: Pooled, ks: Sequence[int], prefix: str, seed: int) -> dict:
    """Mean accuracies over a dataset's tasks, and each task's."""
    per_task = {c: probe_features(features, rows, ks, prefix) for c, rows in tasks(pooled, seed).items()}
    return {**average(list(per_task.values())), "tasks": per_task}
