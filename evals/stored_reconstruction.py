"""Reconstruction of the stored validation rows, per model and per token-set source.

The splice evaluation (evals/splice.py) runs the models, so on a CPU it covers a few thousand
tokens; explained variance needs no forward pass, only the stored rows. This pass encodes and
decodes as many validation rows as the analyses scan (`[eval] scan_rows`, the whole split when it is
smaller) and reports, per model (an SAE: per model it is run on, in the units the analyses feed
it), over all scanned tokens and over each source's tokens (e.g. Bible vs Austen), the statistics
of `evals.reconstruction.ReconstructionStats`: explained variance (about that group's own mean),
its per-token legacy form, mse, cosine, norms and shrinkage.

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

ALL = "all"  # the group of every scanned token, beside one group per source


def _codes_input(dictionary, batch: Batch, columns: Sequence[str], device) -> list[tuple[str, torch.Tensor]]:
    """(model name, [b, n_models, d] input) per reconstruction the dictionary makes of this batch."""
    xs = [x.to(device) for x in batch.inputs]
    if columns == [JOINT]:
        return [(JOINT, torch.stack(xs, 1))]
    return [(c, x[:, None, :]) for c, x in zip(columns, xs)]


def reconstruction_by_source(dictionary, batches: Callable[[], Iterable[Batch]], labels: np.ndarray,
                             source_names: Sequence[str], columns: Sequence[str], model_names: Sequence[str],
                             context_length: int, *, device="cpu") -> dict:
    """{model: {"all" | source name: metrics + "tokens"}} over the rows `batches()` yields.

    `batches` is called twice (means, then reconstructions) and must yield the same rows both
    times; `labels` [n_sequences of the scanned block] gives each sequence's source index.
    `columns` are the analyses' columns ([JOINT] for a crosscoder, whose models are `model_names`).
    """
    groups = [ALL, *source_names]
    models = list(model_names) if list(columns) == [JOINT] else list(columns)
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    d = dictionary.d_model
    sums = torch.zeros(len(models), len(groups), d, dtype=torch.float64)
    counts = torch.zeros(len(groups), dtype=torch.float64)
    for batch in batches():
        group = labels_t[batch.rows // context_length] + 1
        counts[0] += len(group)
        counts.index_add_(0, group, torch.ones(len(group), dtype=torch.float64))
        for m, x in enumerate(batch.inputs):
            x = x.double()
            sums[m, 0] += x.sum(0)
            sums[m].index_add_(0, group, x)
    means = (sums / counts.clamp_min(1)[None, :, None]).float()
    stats = {(m, g): ReconstructionStats() for m in models for g in groups}
    was_training = dictionary.training
    dictionary.eval()
    with torch.no_grad():
        for batch in batches():
            group = (labels_t[batch.rows // context_length] + 1).to(device)
            for column, x in _codes_input(dictionary, batch, columns, device):
                x_hat = dictionary.decode(dictionary.encode(x))
                for i in range(x.shape[1]):
                    m = models.index(model_names[i]) if column == JOINT else models.index(column)
                    xi, hi = x[:, i], x_hat[:, i]
                    stats[models[m], ALL].update(xi, hi, means[m, 0])
                    for g in range(1, len(groups)):
                        sel = group == g
                        if bool(sel.any()):
                            stats[models[m], groups[g]].update(xi[sel], hi[sel], means[m, g])
    dictionary.train(was_training)
    return {m: {g: {"tokens": stats[m, g].n, **stats[m, g].metrics()} for g in groups if stats[m, g].n}
            for m in models}
