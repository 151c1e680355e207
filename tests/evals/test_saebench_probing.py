"""Sparse probing: separable synthetic classes, the top-k rule and the task sampling against
brute force, and the pooling of a tiny model's activations against a token-by-token computation."""

from __future__ import annotations

import pytest
import torch

from evals.saebench.config import ProbingSpec
from evals.saebench.datasets import Split
from evals.saebench.sparse_probing import Pooled, pool, probe_dataset, tasks, top_k_by_mean_gap
from evals.saebench.view import SaeView
from mdiff.tiny import make_corpus, make_model, make_tokenizer
from pipeline.config import HookSpec
from pipeline.hooks import capture


def synthetic(n_per_class=60, m=40, carrier=17, seed=0) -> Pooled:
    """Two classes; latent `carrier` is 1 on class a and 0 on class b, every other latent noise."""
    gen = torch.Generator().manual_seed(seed)
    n = 2 * n_per_class
    codes = torch.rand(n, m, generator=gen)
    labels = ["a"] * n_per_class + ["b"] * n_per_class
    codes[:, carrier] = torch.tensor([1.0 if c == "a" else 0.0 for c in labels]) + 0.05 * torch.rand(n, generator=gen)
    test = torch.rand(n, generator=gen) < 0.3
    return Pooled(labels, test, torch.randn(n, 8, generator=gen), {"sae": codes})


def test_one_latent_carrying_the_label_gives_accuracy_near_one_at_k_1():
    pooled = synthetic()
    result = probe_dataset(pooled.codes["sae"], pooled, [1, 2, 5], "sae", seed=0)
    assert result["sae_top_1_test_accuracy"] == 1.0 and result["sae_top_5_test_accuracy"] == 1.0
    # the model's features here are noise: about chance
    llm = probe_dataset(pooled.model, pooled, [1], "llm", seed=0)
    assert llm["llm_top_1_test_accuracy"] < 0.8


def test_top_k_by_mean_gap_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=gen)
    y = (torch.rand(50, generator=gen) < 0.5).float()
    gaps = [abs(float(x[y > 0, j].mean() - x[y == 0, j].mean())) for j in range(12)]
    want = sorted(range(12), key=lambda j: -gaps[j])[:4]
    assert top_k_by_mean_gap(x, y, 4).tolist() == want
    assert top_k_by_mean_gap(torch.zeros(4, 3), torch.tensor([1.0, 0, 1, 0]), 2).tolist() == [0, 1]  # ties: lower index


def test_tasks_are_balanced_one_vs_rest_within_each_split():
    labels = ["a"] * 30 + ["b"] * 12 + ["c"] * 20
    test = torch.tensor([i % 4 == 0 for i in range(len(labels))])
    pooled = Pooled(labels, test, torch.zeros(len(labels), 1), {})
    out = tasks(pooled, seed=0)
    assert list(out) == ["a", "b", "c"]
    for c, (train_rows, y_train, test_rows, y_test) in out.items():
        for rows, y, is_test in ((train_rows, y_train, False), (test_rows, y_test, True)):
            assert int(y.sum()) == int((1 - y).sum()) > 0  # as many negatives as positives
            assert all(bool(test[r]) == is_test for r in rows.tolist())
            assert all((labels[r] == c) == bool(t) for r, t in zip(rows.tolist(), y.tolist()))
            assert len(set(rows.tolist())) == len(rows)
    two = tasks(Pooled(["x"] * 6 + ["y"] * 6, torch.tensor([False, True] * 6), torch.zeros(12, 1), {}), seed=0)
    assert list(two) == ["x"]  # two classes: one task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("probing")
    files = make_corpus(d / "corpus", n_docs=60)
    tok = make_tokenizer(files["text"].read_text().split("\n\n"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_model(d / "m", tok, "llama", d_model=16, n_layers=2)).eval()
    return model, tok


def test_pooling_matches_a_token_by_token_computation(tiny):
    model, tok = tiny
    hook, scale = HookSpec(1, "resid_post"), 2.5
    texts = {"a": ["the king went to the river", "a small house"], "b": ["bread and wine" + tok.eos_token, "night"]}
    split = Split("t", {"a": texts["a"][:1], "b": texts["b"][:1]}, {"a": texts["a"][1:], "b": texts["b"][1:]})
    w = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    view = SaeView(lambda x: (x @ w).relu(), torch.randn(10, 16))
    pooled = pool(model, tok, split, hook, scale, {"sae": view}, ProbingSpec(context_length=5, batch_size=3))
    order = [texts["a"][0], texts["b"][0], texts["a"][1], texts["b"][1]]  # train then test, class by class
    assert pooled.labels == ["a", "b", "a", "b"] and pooled.test.tolist() == [False, False, True, True]
    for i, text in enumerate(order):
        ids = [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids][:5]
        with torch.inference_mode():
            h = capture(model, torch.tensor([ids]), [hook])[hook][0].float() * scale
        kept = [p for p, t in enumerate(ids) if p > 0 and t not in (tok.eos_token_id, tok.pad_token_id)]
        assert torch.allclose(pooled.model[i], h[kept].mean(0), atol=1e-5)
        assert torch.allclose(pooled.codes["sae"][i], view.encode_fn(h[kept]).mean(0), atol=1e-5)
