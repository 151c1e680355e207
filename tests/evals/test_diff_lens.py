"""The activation-difference lens: a planted mean shift's token is what the lens reads, the mean
difference matches the model's own hidden states, count_marked on hand-counted texts, the config
checks and the driver's files."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from evals import diff_lens as L
from evals.analysis_specs import DiffLensSpec, check_lens_models, rules
from pipeline.typed_config import Rules, from_mapping


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus, its tokenizer, and a random llama with MLP biases (zero at init)."""
    from transformers import AutoModelForCausalLM

    from mdiff.tiny import make_corpus, make_tokenizer, model_config

    text = make_corpus(tmp_path_factory.mktemp("lens"), n_docs=60)["text"].read_text()
    tok = make_tokenizer(text.split("\n\n"))
    cfg = model_config("llama", len(tok), d_model=64, n_layers=3)
    cfg.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return tok, text, model


def planted_pair(model, token: int, scale: float):
    """Model B = model A with `scale` * (unit unembedding row of `token`) added to the last layer's
    MLP output bias: h_B - h_A is exactly that vector at every position of the last layer."""
    tuned = copy.deepcopy(model)
    u = model.lm_head.weight[token].detach()
    with torch.no_grad():
        tuned.model.layers[-1].mlp.down_proj.bias += scale * u / u.norm()
    return tuned, scale * u / u.norm()


def own_top_token(model) -> int:
    """A token whose own unembedding direction ranks it first: the planted answer is well defined."""
    w = model.lm_head.weight.detach()
    for t in range(20, w.shape[0]):
        if int((w @ w[t]).argmax()) == t:
            return t
    raise AssertionError("no token ranks first along its own unembedding row")


def test_the_lens_reads_a_planted_shift_as_its_token(tiny):
    tok, text, model = tiny
    token = own_top_token(model)
    tuned, shift = planted_pair(model, token, 4.0)
    ids = L.text_windows(tok, [text], 12, 6)
    assert ids.shape == (12, 6) and (ids[:, 0] == tok.bos_token_id).all()
    spec = DiffLensSpec(n_sequences=10, n_positions=5, batch_size=4, top_tokens=5)
    result = L.difference_lens({"A": model, "B": tuned}, ids, tok, spec)
    assert (result["base"], result["ft"], result["layer"]) == ("A", "B", 2)
    assert result["positions"] == [1, 2, 3, 4] and result["n_sequences"] == 10
    assert "the last" in result["layer_note"]
    assert result["difference_norm"]["overall"] == pytest.approx(4.0, rel=1e-5)
    assert list(result["readers"]) == ["B", "A"]
    for lens in result["readers"].values():
        assert lens["overall"]["promoted"][0]["id"] == token
        assert all(e["promoted"][0]["id"] == token for e in lens["per_position"].values())
        assert lens["overall"]["suppressed"][0]["id"] != token
        assert lens["overall"]["promoted"][0]["token"] == tok.decode([token])
    # the other sign: the token is the most suppressed
    down, _ = planted_pair(model, token, -4.0)
    res = L.difference_lens({"A": model, "B": down}, ids, tok, spec)
    assert res["readers"]["B"]["overall"]["suppressed"][0]["id"] == token
    assert res["readers"]["B"]["overall"]["promoted"][0]["id"] != token
    # the mean difference is the planted vector itself, at every position
    delta = L.mean_difference(model, tuned, ids, layer=2, positions=[1, 3])
    torch.testing.assert_close(delta, shift.double().expand(2, -1), atol=1e-5, rtol=1e-5)


def test_mean_difference_at_an_earlier_layer_matches_the_hidden_states(tiny):
    tok, text, model = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ids = L.text_windows(tok, [text], 9, 7, bos=False)
    assert (ids[:, 0] != tok.bos_token_id).any()
    spec = DiffLensSpec(layer=-2, n_positions=6, include_first_position=True, n_sequences=9, batch_size=4)
    result = L.difference_lens({"base": model, "ft": other}, ids, tok, spec)
    assert result["layer"] == 1 and result["positions"] == [0, 1, 2, 3, 4, 5] and "the last" not in result["layer_note"]
    # brute force: hidden_states[2] is decoder layer 1's output (the last entry alone is normed)
    with torch.no_grad():
        hs = [m(input_ids=ids[:, :6], output_hidden_states=True).hidden_states[2].double() for m in (model, other)]
    want = (hs[1] - hs[0]).mean(0)
    got = L.mean_difference(model, other, ids, layer=1, positions=range(6), batch_size=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert result["difference_norm"]["overall"] == pytest.approx(float(want.mean(0).norm()), rel=1e-4)
    with pytest.raises(ValueError, match="outside model"):
        L.resolve_layer(model, 3)


def test_write_lens_json_and_markdown(tiny, tmp_path):
    tok, text, model = tiny
    token = own_top_token(model)
    tuned, _ = planted_pair(model, token, 4.0)
    result = L.difference_lens({"A": model, "B": tuned}, L.text_windows(tok, [text], 4, 5), tok,
                               DiffLensSpec(n_sequences=4, top_tokens=3, readers=["B"]))
    paths = L.write_lens(result, tmp_path)
    assert json.loads(paths["json"].read_text()) == result
    md = paths["md"].read_text()
    assert "Read through B's final norm" in md and "Read through A's" not in md
    ranked = [ln for ln in md.splitlines() if re.fullmatch(r"\| \d+ \| `.*` \| \S+ \| `.*` \| \S+ \|", ln)]
    top = result["readers"]["B"]["overall"]["promoted"][0]["token"]
    assert len(ranked) == 3 and ranked[0].startswith(f"| 1 | `{top}` |") and "| position | tokens |" in md
    assert L.top_tokens(result) == [t["token"] for t in result["readers"]["B"]["overall"]["promoted"]]


def test_count_marked_hand_counted():
    a = "unto the Lord, unto him; thereof. and the and"  # 45 characters
    b = "and then the ball, and the dance and tea at the park ..."
    # " unto": A 1 (the first has no space), B 0: (1+1)/45 vs (0+1)/56 -> ratio 2.5, not marked at 5
    # "unto": A 2 -> 3/45 vs 1/56 = 3.73: not marked at 5, marked at 3
    # "thereof": A 1 -> 2/45 vs 1/56 = 2.49; " the": A 1, B 3 -> below 1
    tokens = [" unto", "unto", "thereof", " the", "  ", ""]
    assert L.count_marked(tokens, a, b) == 0
    assert L.count_marked(tokens, a, b, ratio=3) == 1
    assert L.count_marked(tokens, a, b, ratio=2.4) == 3
    assert L.count_marked(["x"], "x" * 9, "y" * 10, ratio=10) == 1  # (9+1)/9 vs 1/10: 11.1
    with pytest.raises(ValueError):
        L.count_marked(["x"], "", "b")


def _parse(data):
    errors: list[str] = []
    spec = from_mapping(DiffLensSpec, data, "eval.diff_lens", errors, Rules(checks=rules()))
    return spec, errors


def test_spec_is_validated_and_names_checked(tmp_path):
    spec, errors = _parse({"layer": -3, "readers": ["kjv"], "n_positions": 8})
    assert not errors and spec == DiffLensSpec(layer=-3, readers=["kjv"], n_positions=8)
    _, errors = _parse({"positions": 5})
    assert len(errors) == 1 and "unknown key" in errors[0]
    _, errors = _parse({"n_positions": 1, "n_sequences": 0, "readers": ["a", "a"], "base": "a", "ft": "a"})
    assert len(errors) == 4, errors
    assert not _parse({"n_positions": 1, "include_first_position": True})[1]
    (tmp_path / "t.txt").write_text("text")
    errors = []
    out = check_lens_models(DiffLensSpec(ft="x", readers=["base", "y"], text_paths=["t.txt", "missing.txt"]),
                            ["base", "kjv"], "eval.diff_lens", errors, base_dir=str(tmp_path))
    assert len(errors) == 3, errors
    assert out.text_paths == [str(tmp_path / "t.txt"), str(tmp_path / "missing.txt")]


def test_driver_on_an_experiment_with_text_files(tmp_path):
    from mdiff.config import load_config
    from mdiff.tiny import build_fixture, write_config

    fx = build_fixture(tmp_path, archs=("llama",), seeds=(0, 1), n_docs=40, d_model=32, n_layers=2)
    cfg = load_config(write_config(tmp_path / "exp.toml", fx, store=str(tmp_path / "store")))
    spec = DiffLensSpec(text_paths=[str(fx["corpus"]["text"])], n_sequences=6, n_positions=4, top_tokens=4,
                        device="cpu")
    logs = []
    result = L.run_difference_lens(cfg, spec, tmp_path / "lens", progress=False, log=logs.append)
    assert (result["base"], result["ft"], result["layer"]) == ("llama-s0", "llama-s1", 1)
    assert result["source"]["texts"] == spec.text_paths and result["n_sequences"] == 6
    assert set(result["readers"]) == {"llama-s0", "llama-s1"}
    assert all(len(r["overall"]["promoted"]) == 4 for r in result["readers"].values())
    saved = json.loads((tmp_path / "lens" / "diff_lens.json").read_text())
    assert saved["readers"] == result["readers"] and (tmp_path / "lens" / "diff_lens.md").is_file()
    assert logs and "layer 1 of 2" in logs[0]
