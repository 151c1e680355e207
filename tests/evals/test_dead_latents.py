"""Dead latents in two senses, kept apart: `dead_latents` (the training definition, from the
dictionary folder's activity record) and `silent_on_eval` (never fired on the evaluated tokens),
with SAEBench's `l1` and `frac_alive` beside them; and the crosscoder's decoder-norm classes and
histograms leaving the dead latents out.

A tiny store of two models and a briefly trained crosscoder; the activity record is planted, so
the expected masks are known, and the codes are recomputed by brute force from the store.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from evals import diff as D
from evals import splice as SP
from evals.config import EvalSpec
from mdiff.config import load_config
from mdiff.tiny import build_fixture, write_config
from mdiff.tiny import train_section as tiny_train_section
from pipeline import store as S
from pipeline.cache import run_cache
from trainer import train as T
from trainer.trained import LATENT_ACTIVITY_FILE, TrainedDictionaryError, open_trained

MODELS = ["llama-s0", "llama-s1"]
N_LATENTS = 48
DEAD_AFTER = 2048  # tiny_train_section's dead_after_tokens
N_SEQ = 8


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("dead")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=120, d_model=32, n_layers=2)
    kw = {"n_tokens": 2048, "hooks": ((1, "resid_post"),), "store": str(d / "store"), "storage_dtype": "float32"}
    train = tiny_train_section(MODELS, [f'name = "cc"\narchitecture = "relu"\nn_latents = {N_LATENTS}\n'
                                        'l1_coefficient = 0.3'], steps=40, lr=3e-3, eval_every=40,
                               eval_batches=1, checkpoint_every=1000, read_threads=1)
    cfg = load_config(write_config(d / "cc.toml", fx, name="cc", train=train, **kw))
    run_cache(cfg, log=quiet, progress=False)
    out = T.run_train(cfg, log=quiet, progress=False).out_dir / "cc"
    return {"cfg": cfg, "dir": out, "tok": fx["tokenizer"], "models": {}}


def plant_activity(dict_dir, since: torch.Tensor | None) -> None:
    path = dict_dir / LATENT_ACTIVITY_FILE
    path.unlink(missing_ok=True)
    if since is not None:
        save_file({"tokens_since_fired": since}, str(path))


def planted() -> tuple[torch.Tensor, np.ndarray]:
    since = torch.randint(0, 2 * DEAD_AFTER, (N_LATENTS,), generator=torch.Generator().manual_seed(5))
    since[:2] = torch.tensor([DEAD_AFTER - 1, DEAD_AFTER])  # the boundary: 2047 alive, 2048 dead
    return since, (since >= DEAD_AFTER).numpy()


def codes(run, n_seq: int, include_first: bool = False) -> np.ndarray:
    """Brute force: the crosscoder's joint codes on the first n_seq validation sequences."""
    trained = open_trained(run["dir"], run["cfg"])
    ts, ctx = trained.token_set, trained.token_set.context_length
    lo = ts.n_train_sequences * ctx
    x = torch.stack([S.read_rows(a, lo, lo + n_seq * ctx).float() for a in trained.arrays], 1)
    if not include_first:
        x = x[torch.arange(x.shape[0]) % ctx != 0]
    with torch.no_grad():
        return trained.dictionary.encode(x).numpy()


def test_dead_mask_reads_the_training_record(run):
    since, mask = planted()
    plant_activity(run["dir"], since)
    trained = open_trained(run["dir"], run["cfg"])
    assert trained.dead_after_tokens == DEAD_AFTER
    got = trained.dead_mask()
    assert got.dtype == torch.bool and got.numpy().tolist() == mask.tolist()
    assert not got[0] and got[1] and trained.dead_latents == int(mask.sum())
    plant_activity(run["dir"], None)  # an older run: the mask is unknown, config.json's count is not
    meta_count = json.loads((run["dir"] / "config.json").read_text())["dead_latents"]
    assert trained.dead_mask() is None and trained.dead_latents == meta_count
    plant_activity(run["dir"], since[:5])
    with pytest.raises(TrainedDictionaryError, match=r"int64 tokens_since_fired \[48\]"):
        trained.dead_mask()
    plant_activity(run["dir"], None)


def test_splice_json_keeps_dead_and_silent_apart_with_l1_and_frac_alive(run, tmp_path):
    since, mask = planted()
    plant_activity(run["dir"], since)
    report = SP.evaluate_dictionary(run["dir"], run["cfg"], out_dir=tmp_path, n_sequences=N_SEQ, batch_size=4,
                                    device="cpu", progress=False, models_cache=run["models"])
    m = report["metrics"]
    f = codes(run, N_SEQ)
    fired = (f > 0).any(0)
    assert m["dead_latents"] == int(mask.sum())
    assert m["dead_latents_definition"].startswith(f"silent for >= {DEAD_AFTER} training tokens")
    assert m["silent_on_eval"] == int((~fired).sum()) and m["silent_on_eval_tokens"] == f.shape[0]
    assert m["frac_alive"] == pytest.approx(fired.mean())
    assert m["l1"] == pytest.approx(np.abs(f).sum(1).mean(), rel=1e-5)
    assert m["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-6)
    assert json.loads((tmp_path / "splice.json").read_text())["metrics"] == m

    plant_activity(run["dir"], None)  # an imported-like folder: no record, no count in config.json
    meta = json.loads((run["dir"] / "config.json").read_text())
    count = meta.pop("dead_latents")
    (run["dir"] / "config.json").write_text(json.dumps(meta))
    try:
        unknown = SP.evaluate_dictionary(run["dir"], run["cfg"], out_dir=None, n_sequences=N_SEQ, batch_size=4,
                                         device="cpu", progress=False, models_cache=run["models"])["metrics"]
    finally:
        (run["dir"] / "config.json").write_text(json.dumps({**meta, "dead_latents": count}))
    assert unknown["dead_latents"] is None and unknown["dead_latents_definition"].startswith("unknown")
    assert unknown["silent_on_eval"] == m["silent_on_eval"]


def _histogram_total(html: str) -> int:
    first = re.search(r"<svg.*?</svg>", html, flags=re.S).group(0)
    return sum(int(n) for n in re.findall(r"\): (\d+)", first))


def _expected_classes(run, excluded: np.ndarray) -> list[str]:
    w = open_trained(run["dir"], run["cfg"]).dictionary.W_dec.detach().double()
    nrm = w.norm(dim=-1).numpy()
    r = nrm[:, 1] / nrm.sum(1)
    cls = np.where(r < 0.1, "llama-s0-only", np.where(r > 0.9, "llama-s1-only",
                   np.where((r >= 0.3) & (r <= 0.7), "shared", "other")))
    return np.where(excluded | ~(nrm.sum(1) > 0), "dead", cls).tolist()


@pytest.mark.parametrize("record", [True, False])
def test_crosscoder_classes_and_histogram_leave_dead_latents_out(run, tmp_path, record):
    since, mask = planted()
    plant_activity(run["dir"], since if record else None)
    spec = EvalSpec(n_sequences=N_SEQ, top_latents=4, contexts_per_latent=2, context_tokens=2)
    notes = []
    summary = D.analyse_dictionary(run["dir"], run["cfg"], spec, tmp_path, run["tok"], progress=False,
                                   log=notes.append, n_sequences=N_SEQ)
    silent = ~(codes(run, N_SEQ) > 0).any(0)
    excluded = mask if record else silent  # the training definition when known, else silent on the scan
    expected = _expected_classes(run, excluded)
    n_out = expected.count("dead")
    with (tmp_path / "relative_norms.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_by_r"] for r in rows] == expected
    assert [int(r["excluded_as_dead"]) for r in rows] == [int(c == "dead") for c in expected]
    assert [r["dead_training"] for r in rows] == ([str(int(x)) for x in mask] if record else [""] * N_LATENTS)
    assert [int(r["silent_on_eval"]) for r in rows] == silent.astype(int).tolist()
    assert summary["counts"]["dead"] == n_out == summary["dead_excluded"]["count"]
    assert sum(summary["counts"].values()) == N_LATENTS
    assert _histogram_total((tmp_path / "relative_norms.html").read_text()) == N_LATENTS - n_out
    assert summary["silent_on_eval"] == int(silent.sum()) and summary["silent_on_eval_tokens"] == summary["n_tokens"]
    shown = {j for ids in summary["groups"].values() for j in ids}
    assert not shown & set(np.flatnonzero(np.array(expected) == "dead").tolist())
    saved = json.loads((tmp_path / "diff.json").read_text())
    if record:
        assert summary["dead_latents"] == int(mask.sum())
        assert saved["dead_excluded"]["definition"].startswith(f"silent for >= {DEAD_AFTER} training tokens")
    else:
        assert saved["dead_excluded"]["definition"].startswith(
            f"silent on the {summary['n_tokens']} scanned validation tokens")
        assert any("no training dead-latent record" in n for n in notes)
    plant_activity(run["dir"], None)
