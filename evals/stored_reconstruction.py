"""Reconstruction of the stored validation rows, per model and per token-set source.

The splice evaluation (evals/splice.py) runs the models, so on a CPU it covers a few thousand
tokens; explained variance needs no forward pass, only the stored rows. This pass encodes and
decodes as many validation rows as the analyses scan (`[eval] scan_rows`, the whole split when it is
smaller) and reports, per model (an SAE: per model it is run on, in the units the analyses feed
it), over all scanned tokens and over each source's tokens (e.g. Bible vs Austen), the statistics
of `evals.reconstruction.ReconstructionStats`: explained variance (about that group's own mean),
its per-token legacy form, mse, cosine, norms and shrinkage.

High-norm tokens are reported apart. Position 0 is never scanned, but a model can still put an
attention sink elsewhere: in the demo's SmolLM2 pair, 30 of 73,152 validation tokens (the second
token of some windows) have norms up to 190x the mean and hold about 90% of the variance about the
mean, so an explained variance pooled over them measures those 30 tokens (0.98) rather than the
text (0.80 on the other tokens). A token whose norm, in any model the dictionary reads, exceeds HIGH_NORM_FACTOR x
sqrt(d_model) (the mean norm of normalized activations) goes to the "high_norm" group and out of
"typical" and the per-source groups; "all" keeps every scanned token.

Two streaming passes over the same rows: the per-group means first, so that each variance is
taken about its mean exactly (as the splice evaluation does), then the reconstructions. Memory is
one batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from .activations import JOINT, Batch
from .reconstruction import ReconstructionStats

ALL = "all"  # every scanned token
TYPICAL = "typical"  # every scanned token but the high-norm ones
HIGH_NORM = "high_norm"
HIGH_NORM_FACTOR = 10.0


def _codes_input(dictionary, batch: Batch, columns: Sequence[str], device) -> list[tuple[str, torch.Tensor]]:
    """(model name, [b, n_models, d] input) per reconstruction the dictionary makes of this batch."""
    xs = [x.to(device) for x in batch.inputs]
    if columns == [JOINT]:
        return [(JOINT, torch.stack(xs, 1))]
    return [(c, x[:, None, :]) for c, x in zip(columns, xs)]


def _membership(batch: Batch, labels: torch.Tensor, n_sources: int, context_length: int) -> torch.Tensor:
    """[rows, groups] bool, the groups in the order ALL, TYPICAL, *sources, HIGH_NORM."""
    high = torch.zeros(len(batch.rows), dtype=torch.bool)
    for x in batch.inputs:
        high |= x.float().norm(dim=-1).cpu() > HIGH_NORM_FACTOR * x.shape[-1] ** 0.5
    source = labels[torch.as_tensor(batch.rows) // context_length]
    member = torch.zeros(len(batch.rows), n_sources + 3, dtype=torch.bool)
    member[:, 0] = True
    member[:, 1] = ~high
    member[torch.arange(len(source)), source + 2] = ~high
    member[:, -1] = high
    return member


def reconstruction_by_source(dictionary, batches: Callable[[], Iterable[Batch]], labels: np.ndarray,
                             source_names: Sequence[str], columns: Sequence[str], model_names: Sequence[str],
                             context_length: int, *, device="cpu") -> dict:
    """{model: {"all" | "typical" | source name | "high_norm": metrics + "tokens"}} over the rows
    `batches()` yields; a group with no token is left out.

    `batches` is called twice (means, then reconstructions) and must yield the same rows both
    times; `labels` [n_sequences of the scanned block] gives each sequence's source index.
    `columns` are the analyses' columns ([JOINT] for a crosscoder, whose models are `model_names`).
    """
    groups = [ALL, TYPICAL, *source_names, HIGH_NORM]
    models = list(model_names) if list(columns) == [JOINT] else list(columns)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    d = dictionary.d_model
    sums = torch.zeros(len(models), len(groups), d, dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.float64)
    for batch in batches():
        member = _membership(batch, labels_t, len(source_names), context_length).double()
        counts += member.sum(0)
        for m, x in enumerate(batch.inputs):
            sums[m] += member.T @ x.double().cpu()
    means = (sums / counts.clamp_min(1)[None, :, None]).float()
    stats = {(m, g): ReconstructionStats() for m in models for g in groups}
    was_training = dictionary.training
    dictionary.eval()
    with torch.no_grad():
        for batch in batches():
            member = _membership(batch, labels_t, len(source_names), context_length).to(device)
            for column, x in _codes_input(dictionary, batch, columns, device):
                x_hat = dictionary.decode(dictionary.encode(x))
                for i in range(x.shape[1]):
                    m = models.index(model_names[i]) if column == JOINT else models.index(column)
                    xi, hi = x[:, i], x_hat[:, i]
                    for g, group in enumerate(groups):
                        sel = member[:, g]
                        if bool(sel.all()):
                            stats[models[m], group].update(xi, hi, means[m, g])
                        elif bool(sel.any()):
                            stats[models[m], group].update(xi[sel], hi[sel], means[m, g])
    dictionary.train(was_training)
    return {m: {g: {"tokens": stats[m, g].n, **stats[m, g].metrics()} for g in groups if stats[m, g].n}
            for m in models}
