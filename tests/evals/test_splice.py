"""Stage three: splicing dictionary reconstructions back into the models.

One tiny cached store (float32 storage, two llama checkpoints, hooks layer1.resid_post and
layer2.resid_pre) and two trained dictionaries (a 2-model crosscoder and an SAE) are built once
for the module; hand-built identity and all-zero dictionaries pin the splice down exactly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from evals import splice as SP
from mdiff.config import load_config
from mdiff.tiny import build_fixture, make_model, write_config
from mdiff.tiny import train_section as tiny_train_section
from pipeline import experiment as E
from pipeline import store as S
from pipeline.cache import run_cache
from pipeline.config import HookSpec
from pipeline.hooks import capture
from trainer import train as T
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary, load_dictionary
from trainer.trained import TrainedDictionaryError

HOOKS = ((1, "resid_post"), (2, "resid_pre"))
N_TOKENS = 4096  # 256 sequences of 16; the last 32 are the validation split
MODELS = ["llama-s0", "llama-s1"]


def train_section(models, dictionary: str) -> str:
    return tiny_train_section(models, [dictionary], steps=40, eval_every=40, eval_batches=1,
                              checkpoint_every=40, read_threads=1)

BTK = 'name = "btk"\narchitecture = "batchtopk"\nn_latents = 64\nk = 4'
RELU = 'name = "relu"\narchitecture = "relu"\nn_latents = 64\nl1_coefficient = 0.05'


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("splice")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=300, d_model=32, n_layers=3)

    def config(name, train="", fixture=fx, **kw):
        kw = {"n_tokens": N_TOKENS, "hooks": HOOKS, "store": str(d / "store"),
              "storage_dtype": "float32", **kw}
        return load_config(write_config(d / f"{name}.toml", fixture, name=name, train=train, **kw))

    cache_cfg = config("cache")
    run_cache(cache_cfg, log=lambda *a: None, progress=False)
    cc = T.run_train(config("cc", train_section(MODELS, BTK)), log=lambda *a: None, progress=False)
    sae = T.run_train(config("sae", train_section(["llama-s0"], RELU)), log=lambda *a: None,
                      progress=False)
    return {"dir": d, "fx": fx, "cfg": cache_cfg, "config": config, "models": {},
            "crosscoder": cc.out_dir / "btk", "sae": sae.out_dir / "relu"}


def evaluate(setup, dict_dir, out=None, cfg=None, **kw):
    kw = {"n_sequences": 16, "batch_size": 8, "device": "cpu", "progress": False, **kw}
    return SP.evaluate_dictionary(dict_dir, cfg or setup["cfg"], out_dir=out,
                                  models_cache=setup["models"], **kw)


def save_handmade(setup, name: str, hook: HookSpec, weights) -> Path:
    """A relu crosscoder over both models at `hook` with the given weights, saved the way
    `mdiff train` saves one (config.json naming the store, token set and arrays)."""
    cfg = setup["cfg"]
    meta = json.loads((setup["crosscoder"] / "config.json").read_text())
    root = S.StoreRoot(cfg.store)
    arrays = [E.find_array(root, meta["tokenset_id"], cfg.model(m), hook) for m in MODELS]
    n, d = len(MODELS), arrays[0].array.shape[1]
    spec = DictionarySpec(name=name, architecture="relu", n_latents=2 * n * d)
    dictionary = build_dictionary(spec, n, d, [a.scale for a in arrays])
    with torch.no_grad():
        weights(dictionary, n, d)
    fixed = {"architecture", "n_models", "d_model", "n_latents", "spec", "scales", "folded"}
    out = setup["dir"] / "handmade" / name
    dictionary.save(out, {**{k: v for k, v in meta.items() if k not in fixed}, "name": name,
                          "hook": hook.label, "arrays": [a.path for a in arrays],
                          "model_keys": [a.attrs["model_key"] for a in arrays]})
    return out


def identity_weights(dictionary, n, d):
    """Latent (i, j, +) is relu(x_ij), latent (i, j, -) is relu(-x_ij): relu(x) - relu(-x) = x.
    Every dot product has one nonzero term, so x_hat == x bit for bit."""
    eye = torch.eye(n * d).view(n, d, n * d)
    dictionary.W_enc.copy_(torch.cat([eye, -eye], dim=2))
    dictionary.W_dec.copy_(torch.cat([eye, -eye], dim=2).permute(2, 0, 1))
    dictionary.b_enc.zero_()
    dictionary.b_dec.zero_()


def zero_weights(dictionary, n, d):
    for p in dictionary.parameters():
        p.zero_()


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer,site", HOOKS)
def test_identity_dictionary_changes_nothing_exactly(setup, layer, site):
    path = save_handmade(setup, f"identity-{site}", HookSpec(layer, site), identity_weights)
    report = evaluate(setup, path)
    metrics = report["metrics"]
    assert metrics["explained_variance"] == 1.0 and metrics["mse"] == 0.0
    for name in MODELS:
        m = metrics["per_model"][name]
        # The splice is h + (x_hat - x) / scale and x_hat == x bit for bit, so the forward is
        # bit-identical to the clean one: exact zeros, not small numbers.
        assert m["ce_diff"] == 0.0 and m["kl_div_with_sae"] == 0.0, (name, m)
        assert m["ce_loss_with_sae"] == m["ce_loss_without_sae"]
        assert m["ce_loss_score"] == 1.0 and m["kl_div_score"] == 1.0
        assert m["explained_variance"] == 1.0 and m["cossim"] == pytest.approx(1.0)
        assert m["store_rel_error"] < 1e-6  # float32 store: h * scale == x up to one rounding
    if site == "resid_post":
        # splice="replace" puts x_hat / scale in: fl(fl(h * scale) / scale) is h only up to the
        # last bit, so here the identity is exact to float32 rounding, no better.
        replaced = evaluate(setup, path, splice="replace")["metrics"]["per_model"]
        for name in MODELS:
            assert abs(replaced[name]["ce_diff"]) < 1e-5
            assert 0.0 <= replaced[name]["kl_div_with_sae"] < 1e-6


def test_zero_dictionary_is_zero_ablation(setup):
    path = save_handmade(setup, "zero", HookSpec(1, "resid_post"), zero_weights)
    # splice="replace" splices x_hat / scale = 0: the very tensor zero ablation uses
    report = evaluate(setup, path, splice="replace")
    metrics = report["metrics"]
    assert metrics["l0"] == metrics["l1"] == metrics["frac_alive"] == 0.0
    assert metrics["silent_on_eval"] == metrics["n_latents"] and metrics["silent_on_eval_tokens"] == 16 * 15
    for name in MODELS:
        m = metrics["per_model"][name]
        assert m["ce_loss_with_sae"] == m["ce_loss_with_ablation"]
        assert m["kl_div_with_sae"] == m["kl_div_with_ablation"] > 0
        assert m["ce_loss_score"] == 0.0 and m["kl_div_score"] == 0.0
        assert m["ce_loss_with_ablation"] != m["ce_loss_without_sae"]
        assert m["l2_norm_out"] == 0.0 and m["l2_ratio"] == 0.0 and m["cossim"] == 0.0
        assert m["explained_variance"] < 0  # 1 - sum x^2 / sum (x - mean)^2
    # the default splice adds the store's float32 rounding (h - x / scale, ~1e-7 relative) back
    default = evaluate(setup, path)["metrics"]["per_model"]
    for name in MODELS:
        m = default[name]
        assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_with_ablation"], abs=1e-5)
        assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-4)


def test_explained_variance_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[2.0, 0.0], [2.0, 1.0]])
    # mean (2, 1); sum ||x - mean||^2 = 2 + 2 = 4; sum ||x - x_hat||^2 = 1 + 2 = 3 -> 1 - 3/4.
    # (About zero it would be 1 - 3/14, the public evals' bug.)
    assert SP.explained_variance(x, x_hat) == pytest.approx(0.25)
    stats = SP.ReconstructionStats()
    stats.update(x[:1], x_hat[:1], x.mean(0))  # accumulated over batches: ratio of sums
    stats.update(x[1:], x_hat[1:], x.mean(0))
    m = stats.metrics()
    assert m["explained_variance"] == pytest.approx(0.25)
    assert m["mse"] == pytest.approx(1.5)
    assert m["l2_norm_in"] == pytest.approx((1 + math.sqrt(13)) / 2)
    assert m["l2_ratio"] == pytest.approx((2 / 1 + math.sqrt(5) / math.sqrt(13)) / 2)
    cos2 = (6 + 2) / (math.sqrt(13) * math.sqrt(5))
    assert m["cossim"] == pytest.approx((1 + cos2) / 2)
    # a crosscoder's x [tokens, n_models, d] pools the models into one vector per token
    assert SP.explained_variance(torch.stack([x, x], 1), torch.stack([x_hat, x_hat], 1)) == \
        pytest.approx(0.25)


PER_MODEL_KEYS = {
    "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation",
    "ce_loss_with_mean_ablation", "ce_diff", "ce_loss_score", "kl_div_with_sae",
    "kl_div_with_ablation", "kl_div_with_mean_ablation", "kl_div_score", "explained_variance",
    "mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "store_rel_error"}


def test_trained_crosscoder_and_sae(setup):
    out = setup["dir"] / "eval"
    cc = evaluate(setup, setup["crosscoder"], out / "btk")
    cached = dict(setup["models"])
    sae = evaluate(setup, setup["sae"], out / "relu")
    assert all(setup["models"][k] is v for k, v in cached.items())  # reused, not reloaded

    for report, names, arch in ((cc, MODELS, "batchtopk"), (sae, ["llama-s0"], "relu")):
        assert json.loads((out / report["dictionary"] / "splice.json").read_text()) == report
        assert report["models"] == names and report["architecture"] == arch
        assert report["hook"] == "layer1.resid_post" and report["experiment"] in ("cc", "sae")
        assert report["seed"] == report["spec"]["seed"] == 0
        assert report["n_sequences"] == 16 and report["n_tokens"] == 16 * 15
        metrics = report["metrics"]
        assert set(metrics["per_model"]) == set(names) == set(report["ce_diff"])
        for name in names:
            m = metrics["per_model"][name]
            assert PER_MODEL_KEYS <= set(m)  # evals/reconstruction.py may add more
            assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
            assert report["ce_diff"][name] == m["ce_diff"]
            assert m["kl_div_with_sae"] >= 0 and m["kl_div_with_ablation"] > 0
            assert m["store_rel_error"] < 1e-6
        assert 0 < metrics["l0"] <= metrics["n_latents"]
        assert 0 <= metrics["dead_latents"] <= metrics["n_latents"] == 64  # the trainer's count
        assert 0 <= metrics["silent_on_eval"] <= metrics["n_latents"]
        assert metrics["frac_alive"] == 1 - metrics["silent_on_eval"] / 64 and metrics["l1"] > 0
        assert metrics["explained_variance"] > 0 and metrics["mse"] > 0
        assert metrics["n_predictions"] == 16 * 14

    # both evaluate llama-s0 on the same tokens: the clean and ablated runs agree
    a, b = cc["metrics"]["per_model"]["llama-s0"], sae["metrics"]["per_model"]["llama-s0"]
    for key in ("ce_loss_without_sae", "ce_loss_with_ablation", "ce_loss_with_mean_ablation"):
        assert a[key] == pytest.approx(b[key], rel=1e-6)

    # the clean CE is the plain model's loss on positions 1..T-2 of the validation sequences
    ts = S.open_token_set(S.StoreRoot(setup["cfg"].store), cc["tokenset_id"])
    ids = torch.from_numpy(ts.tokens[ts.n_train_sequences:ts.n_train_sequences + 16]).long()
    model = setup["models"]["llama-s0"].model
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits[:, 1:-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    assert a["ce_loss_without_sae"] == pytest.approx(float(ce), rel=1e-5)

    # one forward of the 4 variants stacked (the GPU default) instead of four of b (the CPU
    # default): the same numbers
    stacked = evaluate(setup, setup["crosscoder"], stack_variants=True)["metrics"]["per_model"]
    for name in MODELS:
        for key, value in cc["metrics"]["per_model"][name].items():
            assert stacked[name][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)

    # splicing the stored activation or the live one differs by float32 rounding only
    replaced = evaluate(setup, setup["crosscoder"], splice="replace")["metrics"]["per_model"]
    for name in MODELS:
        assert replaced[name]["ce_loss_with_sae"] == pytest.approx(
            cc["metrics"]["per_model"][name]["ce_loss_with_sae"], abs=1e-4)


def test_ce_diff_stderr_is_the_spread_of_the_per_sequence_ce_diffs(setup):
    """Brute force: the first k sequences' ce_diff, k = 1..6, gives each sequence's own ce_diff
    (every sequence scores the same number of predictions); their sample standard deviation over
    sqrt(6) is the standard error reported for 6 sequences, whatever the batching."""
    full = [evaluate(setup, setup["sae"], n_sequences=6, batch_size=b)["metrics"]["per_model"]["llama-s0"]
            for b in (6, 4)]
    means = [evaluate(setup, setup["sae"], n_sequences=k, batch_size=4)["ce_diff"]["llama-s0"]
             for k in range(1, 7)]
    per_seq = np.array([k * m - (k - 1) * p for k, m, p in zip(range(1, 7), means, [0.0, *means])])
    # each ce_diff is a difference of two float32 mean losses; recovering one sequence amplifies that k-fold
    assert full[0]["ce_diff"] == pytest.approx(per_seq.mean(), abs=1e-6)
    expected = per_seq.std(ddof=1) / np.sqrt(6)
    assert expected > 0
    for m in full:
        assert m["ce_diff_stderr"] == pytest.approx(expected, rel=1e-2)  # ddof=0 would be 9.5% off


def test_batched_variants_equal_separate_forwards(setup):
    """One batch of the trained crosscoder: the 4*b stacked forward against four b forwards."""
    meta = json.loads((setup["crosscoder"] / "config.json").read_text())
    root = S.StoreRoot(setup["cfg"].store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    arrays = [S.open_activation_array(root, p) for p in meta["arrays"]]
    lo, b, ctx = ts.n_train_sequences, 4, ts.context_length
    ids = torch.from_numpy(ts.tokens[lo:lo + b]).long()
    x = SP._read_batch(arrays, lo * ctx, (lo + b) * ctx).view(b, ctx, 2, -1)[:, 1:]
    dictionary = load_dictionary(setup["crosscoder"]).eval()
    with torch.no_grad():
        x_hat = dictionary.decode(dictionary.encode(x.reshape(-1, 2, x.shape[-1]))).view_as(x)
    hook = HookSpec(1, "resid_post")
    for i, name in enumerate(MODELS):
        model, s = setup["models"][name].model, meta["scales"][i]
        splices = [SP.Splice("keep"), SP.Splice("add", (x_hat[:, :, i] - x[:, :, i]) / s),
                   SP.Splice("set", torch.zeros(())), SP.Splice("set", x[:, :, i].mean((0, 1)) / s)]
        with torch.inference_mode():
            both = [SP.variant_losses(model, SP.spliced_final_hidden(model, ids, hook, splices,
                                                                     batched=batched), ids, 4)
                    for batched in (True, False)]
        torch.testing.assert_close(both[0].nll, both[1].nll, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(both[0].kl, both[1].kl, rtol=1e-5, atol=1e-7)
        assert both[0].count == both[1].count == b * (ctx - 2)
        torch.testing.assert_close(both[0].nll_per_sequence, both[1].nll_per_sequence, rtol=1e-6, atol=1e-6)
        with torch.inference_mode():  # each sequence's sums from the full logits
            final = SP.spliced_final_hidden(model, ids, hook, splices, batched=False)
            logp = torch.log_softmax(SP.logits_fn(model)(final), -1).view(4, b, ctx, -1)
        want = -logp[:, :, 1:-1].gather(-1, ids[:, 2:].expand(4, b, -1)[..., None]).squeeze(-1).double().sum(-1)
        torch.testing.assert_close(both[1].nll_per_sequence, want, rtol=1e-5, atol=1e-4)
        assert len(set(both[0].nll.tolist())) == 4  # the four variants really differ


@pytest.mark.parametrize("arch", ["bloom", "gpt_neox", "gemma2"])
def test_splice_hooks_and_logits_across_architectures(setup, arch):
    """Tuple outputs (bloom), another layer path (gpt_neox), logit softcapping (gemma2)."""
    path = make_model(setup["dir"] / "arch" / arch, setup["fx"]["tokenizer"], arch, 32, 3)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    for site in ("resid_pre", "resid_post"):
        hook = HookSpec(1, site)
        with torch.inference_mode():
            h = capture(model, ids, [hook])[hook]
            splices = [SP.Splice("keep"), SP.Splice("set", h[:, 1:]), SP.Splice("add", h[:, 1:] * 0),
                       SP.Splice("set", torch.zeros(()))]
            final = SP.spliced_final_hidden(model, ids, hook, splices)
            torch.testing.assert_close(SP.logits_fn(model)(final[:2]), model(input_ids=ids).logits)
            for j in (1, 2):
                assert torch.equal(final[:2], final[2 * j:2 * j + 2]), (site, j)
            assert not torch.equal(final[:2, 1:], final[6:, 1:])
            assert torch.equal(final[:2, 0], final[6:, 0])  # position 0 is never edited
            losses = SP.variant_losses(model, final, ids, 4)
            assert losses.kl[:3].tolist() == [0.0, 0.0, 0.0] and losses.kl[3] > 0


def test_mismatches_are_named(setup):
    """Opening a dictionary with another experiment's config, or a model with other weights, is
    refused with a message naming both sides (the checks of trainer.trained, used by every stage)."""
    config, fx = setup["config"], setup["fx"]
    other_tokens = config("other-tokens", n_tokens=2048)
    with pytest.raises(TrainedDictionaryError, match="token set ts-.* token set ts-"):
        evaluate(setup, setup["crosscoder"], cfg=other_tokens)
    other_store = config("other-store", store=str(setup["dir"] / "elsewhere"))
    with pytest.raises(TrainedDictionaryError, match=r"store .*store.*elsewhere"):
        evaluate(setup, setup["crosscoder"], cfg=other_store)
    swapped = {**fx, "models": {"llama-s0": fx["models"]["llama-s1"],
                                "llama-s1": fx["models"]["llama-s0"]}}
    with pytest.raises(TrainedDictionaryError, match="llama-s0.*weights differ"):
        SP.evaluate_dictionary(setup["crosscoder"], config("swapped", fixture=swapped), out_dir=None,
                               n_sequences=4, batch_size=4, device="cpu", progress=False)
    with pytest.raises(TrainedDictionaryError, match="config.json"):
        evaluate(setup, setup["dir"])


def test_variants_are_stacked_on_a_gpu_only_unless_asked():
    from evals.splice import _stacked

    assert _stacked(None, "cuda:0") and not _stacked(None, "cpu")
    assert _stacked(True, "cpu") and not _stacked(False, "cuda")


# ---------------------------------------------------------------------------------- the store guard


def _finetuned(base: Path, out: Path, tokenizer, steps: int) -> Path:
    """`steps` Adam steps (lr 1e-3) of next-token training on fixed random tokens: a checkpoint
    adjacent to `base`, as a fine-tuning run saves them."""
    model = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(3, len(tokenizer), (8, 8), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _imported_store(tmp_path, acts, ids, storage_dtype: str):
    """The base model's activations, imported (their identity names no weights, so only comparing
    live with stored activations can tell another checkpoint), and a zero SAE saved on them."""
    from pipeline import import_cache as IC
    from tests.interop.foreign_caches import write_dl_cache

    n_rows, ctx = ids.numel(), ids.shape[1]
    src = write_dl_cache(tmp_path / f"cache-{storage_dtype}", acts, [n_rows], tokens=ids.flatten(),
                         ranges=torch.arange(0, n_rows + 1, ctx), name="resid_post_layer_0")
    store = tmp_path / f"store-{storage_dtype}"
    res = IC.import_cache(src, str(store), model="tiny", validation_fraction=0.1, storage_dtype=storage_dtype,
                          chunk_rows=32, shard_rows=64, scale_sample_tokens=100, progress=False,
                          log=lambda *a: None)
    arr = S.open_activation_array(S.StoreRoot(str(store)), res.array_path)
    sae = build_dictionary(DictionarySpec(name="zero", architecture="relu", n_latents=8), 1, acts.shape[1],
                           [arr.scale])
    with torch.no_grad():
        zero_weights(sae, 1, acts.shape[1])
    sae.save(tmp_path / f"sae-{storage_dtype}", {
        "name": "zero", "experiment": "guard", "store": str(store), "tokenset_id": res.tokenset_id,
        "hook": "layer0.resid_post", "models": ["tiny"], "model_keys": [arr.attrs["model_key"]],
        "arrays": [res.array_path]})
    return store, res.tokenset_id, tmp_path / f"sae-{storage_dtype}"


def test_store_guard_refuses_an_adjacent_checkpoint_and_accepts_bfloat16_storage(tmp_path):
    """Five Adam steps move the tiny model's layer-0 output by about 10%: under the old 25% limit
    a splice with the wrong checkpoint went through. bfloat16 storage of the right one is ~0.3%."""
    from mdiff.config import write_config as write_experiment
    from mdiff.tiny import make_corpus, make_tokenizer

    corpus = make_corpus(tmp_path / "corpus", n_docs=40)
    tok = make_tokenizer(corpus["text"].read_text().split("\n\n"))
    base = make_model(tmp_path / "step0", tok, "llama", 16, 2)
    tuned = _finetuned(base, tmp_path / "step5", tok, steps=5)
    ids = torch.randint(3, len(tok), (40, 8), generator=torch.Generator().manual_seed(24))
    ids[:, 0] = tok.bos_token_id
    with torch.no_grad():
        acts = AutoModelForCausalLM.from_pretrained(base).eval()(ids, output_hidden_states=True)
        acts = acts.hidden_states[1].reshape(-1, 16)  # layer0.resid_post
    store, ts_id, sae = _imported_store(tmp_path, acts, ids, "bfloat16")

    def config(weights: Path, dtype: str):
        return load_config(write_experiment(tmp_path / f"{weights.name}-{dtype}.toml", {
            "name": "guard", "store": str(store), "hooks": [{"layer": 0}], "tokens": {"tokenset": ts_id},
            "models": [{"name": "tiny", "path": str(weights), "imported": "tiny", "dtype": dtype}]}))

    def splice(weights: Path, dtype: str = "float32"):
        return SP.evaluate_dictionary(sae, config(weights, dtype), out_dir=None, n_sequences=4, batch_size=4,
                                      device="cpu", progress=False)

    with pytest.raises(SP.SpliceError) as e:
        splice(tuned)
    message = str(e.value)
    assert "'tiny'" in message and "above the 5%" in message and "path, repo, revision" in message
    rel = float(re.search(r"by ([0-9.]+)% of their norm", message).group(1)) / 100
    assert SP.STORE_MISMATCH_LIMIT < rel < 0.25, rel  # refused now, accepted by the old limit
    right = splice(base)["metrics"]["per_model"]["tiny"]["store_rel_error"]
    assert 1e-3 < right < 0.01, right  # bfloat16 rounding only
    other_dtype = splice(base, "bfloat16")["metrics"]["per_model"]["tiny"]["store_rel_error"]
    assert other_dtype < SP.STORE_MISMATCH_LIMIT  # computed in bfloat16, stored from float32
    print(f"store_rel_error: adjacent checkpoint {rel:.2%}, same model stored in bfloat16 {right:.3%}, "
          f"and computed in bfloat16 {other_dtype:.3%}")
