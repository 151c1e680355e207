"""An SAE of model A run on model B sees B in A's units (`[eval] transfer_units = "source"`).

Model B is model A with its residual stream scaled by 1.2: the embeddings and every output
projection (attention o_proj, MLP down_proj) times 1.2, which RMSNorm's scale invariance carries
through, so h_B = 1.2 h_A up to RMSNorm's epsilon. Each model's stored rows are normalized by its
own scale, so they are (nearly) equal; in raw units the SAE must see 1.2 times A's activations:
its codes on B are its codes on 1.2 * stored_A. The old convention ("stored") gives A's codes.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evals import diff as D
from evals.config import EvalSpec
from mdiff.config import load_config
from mdiff.tiny import build_fixture, write_config
from pipeline import experiment as E
from pipeline import store as S
from pipeline.cache import run_cache
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary

FACTOR = 1.2
N_SEQ = 8
N_LATENTS = 16
HOOK = "layer1.resid_post"


def quiet(*_):
    pass


def scaled_copy(src, dst, tokenizer, factor: float):
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(factor)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("transfer")
    fx = build_fixture(d, archs=("llama",), seeds=(0,), n_docs=120, d_model=32, n_layers=3)
    fx["models"]["big"] = scaled_copy(fx["models"]["llama-s0"], d / "models" / "big", fx["tokenizer"], FACTOR)
    cfg = load_config(write_config(d / "exp.toml", fx, n_tokens=2048, hooks=((1, "resid_post"),),
                                   store=str(d / "store"), storage_dtype="float32", name="exp"))
    run_cache(cfg, log=quiet, progress=False)
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, E.resolve_token_set(cfg).id)
    hook = E.hook_by_label(cfg, HOOK)
    arrays = {m: E.find_array(root, ts.id, cfg.model(m), hook) for m in ("llama-s0", "big")}

    # a ReLU SAE of model A whose biases make firing depend on the input's size
    sae = build_dictionary(DictionarySpec(name="sae", architecture="relu", n_latents=N_LATENTS), 1, 32,
                           [arrays["llama-s0"].scale])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(1, 32, N_LATENTS, generator=g)
        sae.W_enc.copy_(w / w.norm(dim=1, keepdim=True))
        sae.b_enc.fill_(-0.8)
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.randn(N_LATENTS, 1, 32, generator=g) * 0.1)
    a = arrays["llama-s0"]
    sae.save(d / "sae", {"name": "sae", "experiment": "exp", "store": cfg.store, "tokenset_id": ts.id,
                         "hook": HOOK, "models": ["llama-s0"], "model_keys": [a.attrs["model_key"]],
                         "arrays": [a.path]})
    return {"cfg": cfg, "dir": d / "sae", "sae": sae.eval(), "arrays": arrays, "ts": ts, "tok": fx["tokenizer"]}


def stored_rows(pair, model: str) -> torch.Tensor:
    ts, ctx = pair["ts"], pair["ts"].context_length
    lo = ts.n_train_sequences * ctx
    x = S.read_rows(pair["arrays"][model], lo, lo + N_SEQ * ctx).float()
    return x[torch.arange(x.shape[0]) % ctx != 0]


def stats_of(sae, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        f = sae.encode(x[:, None, :]).numpy()
    return (f > 0).mean(0), f.mean(0)


def analyse(pair, tmp_path, units: str):
    notes = []
    spec = EvalSpec(n_sequences=N_SEQ, top_latents=N_LATENTS, contexts_per_latent=1, context_tokens=1,
                    transfer_units=units)
    summary = D.analyse_dictionary(pair["dir"], pair["cfg"], spec, tmp_path / units, pair["tok"], progress=False,
                                   log=notes.append, n_sequences=N_SEQ)
    with (tmp_path / units / "activation_stats.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["ranking"] == "mean"]
    return summary, rows, notes


def test_the_pair_differs_by_the_planted_factor(pair):
    a, b = pair["arrays"]["llama-s0"], pair["arrays"]["big"]
    assert a.scale / b.scale == pytest.approx(FACTOR, rel=1e-3)  # s_B = s_A / 1.2
    xa, xb = stored_rows(pair, "llama-s0"), stored_rows(pair, "big")
    assert float((xb - xa).norm() / xa.norm()) < 1e-3  # stored rows: the same up to RMSNorm's epsilon


def test_sae_sees_the_other_model_in_its_own_units(pair, tmp_path):
    summary, rows, notes = analyse(pair, tmp_path, "source")
    xa = stored_rows(pair, "llama-s0")
    freq_a, mean_a = stats_of(pair["sae"], xa)
    freq_raw, mean_raw = stats_of(pair["sae"], FACTOR * xa)  # the planted answer: B = 1.2 A in raw units
    assert abs(freq_raw.sum() - freq_a.sum()) > 0.5  # the two conventions differ by > half a latent per token
    assert summary["activation"]["big"]["l0_B"] == pytest.approx(freq_raw.sum(), abs=0.02)
    assert summary["activation"]["big"]["l0_A"] == pytest.approx(freq_a.sum(), abs=1e-6)
    assert len(rows) == int((freq_raw + freq_a > 0).sum())
    for r in rows:
        j = int(r["latent"])
        assert float(r["mean_B"]) == pytest.approx(mean_raw[j], rel=2e-3, abs=1e-4)
        assert float(r["freq_B"]) == pytest.approx(freq_raw[j], abs=0.01)
    assert summary["transfer_units"] == "source"
    assert summary["input_factors"]["big"] == pytest.approx(FACTOR, rel=1e-3)
    assert json.loads((tmp_path / "source" / "diff.json").read_text())["transfer_units"] == "source"
    assert any("in llama-s0's units" in n and "transfer_units = 'source'" in n for n in notes)
    assert "(transfer_units = &#x27;source&#x27;; big x 1.2)" in (tmp_path / "source" / "latents.html").read_text()


def test_stored_units_keep_the_old_convention(pair, tmp_path):
    summary, rows, notes = analyse(pair, tmp_path, "stored")
    freq_a, mean_a = stats_of(pair["sae"], stored_rows(pair, "llama-s0"))
    assert summary["activation"]["big"]["l0_B"] == pytest.approx(freq_a.sum(), abs=0.02)  # A's codes again
    for r in rows:
        assert float(r["mean_B"]) == pytest.approx(mean_a[int(r["latent"])], rel=2e-3, abs=1e-4)
    assert summary["transfer_units"] == "stored" and summary["input_factors"]["big"] == 1.0
    assert any("transfer_units = 'stored'" in n for n in notes)
