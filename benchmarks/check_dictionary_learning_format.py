"""Check the dictionary_learning format against dictionary_learning itself (in .venv-peers).

Each dictionary class of dictionary-learning 0.1.0 is built by that package with random weights,
saved as it saves them (`torch.save(ae.state_dict(), "ae.pt")` + config.json naming the
dict_class), read with `trainer.formats.dictionary_learning.read`, re-expressed for store rows
(scale 0.37), and its reconstruction of raw activations compared with the package's own forward.

    .venv-peers/bin/python -m benchmarks.check_dictionary_learning_format

Exits 1 if any difference exceeds 1e-5 of the largest reconstruction value.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common.format_checks import SCALE, TOLERANCE, D, M, compare, ours_raw, raw_activations
from trainer.formats import dictionary_learning as ours_dl


def classes():
    from dictionary_learning.dictionary import AutoEncoder, AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    return {"AutoEncoder": lambda: AutoEncoder(D, M), "AutoEncoderNew": lambda: AutoEncoderNew(D, M),
            "GatedAutoEncoder": lambda: GatedAutoEncoder(D, M),
            "JumpReluAutoEncoder": lambda: JumpReluAutoEncoder(D, M),
            "AutoEncoderTopK": lambda: AutoEncoderTopK(D, M, 16),
            "BatchTopKSAE": lambda: BatchTopKSAE(D, M, 16),
            "MatryoshkaBatchTopKSAE": lambda: MatryoshkaBatchTopKSAE(D, M, 16, [M // 4, M - M // 4])}


def main() -> int:
    from importlib.metadata import version

    print(f"dictionary-learning {version('dictionary-learning')}, torch {torch.__version__}")
    x, rows = raw_activations(0), []
    g = torch.Generator().manual_seed(1)
    for cls, make in classes().items():
        ae = make()
        with torch.no_grad():
            for name, p in ae.named_parameters():
                scale = 1.0 if "bias" in name or "b_dec" in name else 0.2
                p.copy_(torch.randn(p.shape, generator=g) * scale)
                if name == "threshold":
                    p.copy_(torch.rand(p.shape, generator=g) + 0.2)
            if "threshold" in dict(ae.named_buffers()):
                ae.threshold.fill_(0.8)  # BatchTopK: an estimated inference threshold
        folder = Path(tempfile.mkdtemp(prefix="dl-check-"))
        torch.save(ae.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": cls, "layer": 3}}))
        ours = ours_dl.read(folder).on_store([SCALE])
        with torch.no_grad():
            ref, fired = ae(x), float((ae.encode(x) > 0).float().mean())
        rows.append(compare(cls, ours_raw(ours, x), ref, fired))
    worst = max(r["relative"] for r in rows)
    print(f"largest absolute difference: {max(r['max_abs_diff'] for r in rows):.3e} (relative {worst:.1e})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
