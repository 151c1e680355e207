"""Foreign dictionary formats (SAELens, dictionary_learning, the Gemma crosscoder release).

Each format is built here from its documented layout with small random weights, read through
trainer.formats, and compared with that format's forward pass written out below from its
definition (never through the converter): on raw activations, and on store rows (raw * scale)
after re-expression. Then: SAELens export read back by the format's definition, round trips,
refused pickles, and stage three (splice + analyses) on imported dictionaries in a tiny cached
experiment, checked against the foreign forward applied to the stored rows.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdiff.cli import main as cli_main
from mdiff.config import load_config
from mdiff.tiny import build_fixture, write_config
from pipeline import store as S
from pipeline.cache import run_cache
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary, load_dictionary
from trainer.formats import FormatError, detect_format, read_foreign, saelens

D, M, B = 12, 40, 64  # d_model, latents, tokens
STORE_SCALES = [0.37, 1.9]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raw(seed: int, n_models: int = 1, d: int = D) -> torch.Tensor:
    """Raw activations [B, n_models, d]: an offset and a scale far from 1, as residual streams have."""
    g = _gen(seed)
    return torch.randn(B, n_models, d, generator=g) * 3 + torch.randn(n_models, d, generator=g)


def _w(g, *shape, scale=0.3):
    return torch.randn(*shape, generator=g) * scale


def _close(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def _run(dictionary, x):
    with torch.no_grad():
        return dictionary.decode(dictionary.encode(x))


def _check(foreign, x_raw, reference):
    """Our dictionary on raw activations, and on store rows mapped back to raw units, both equal
    the foreign forward on the raw activations."""
    ref = reference(x_raw)
    _close(_run(foreign.on_raw(), x_raw), ref)
    s = torch.tensor(STORE_SCALES[:x_raw.shape[1]])[None, :, None]
    store = foreign.on_store(STORE_SCALES[:x_raw.shape[1]])
    assert not store.folded and store.scales == STORE_SCALES[:x_raw.shape[1]]
    _close(_run(store, x_raw * s) / s, ref)


# ----------------------------------------------------------------------------------------------
# SAELens: the forward of sae_lens.SAE (process_sae_in, encode, decode) for each architecture
# ----------------------------------------------------------------------------------------------


def saelens_forward(cfg: dict, t: dict, x: torch.Tensor, scaling_factor: float = 1.0) -> torch.Tensor:
    """x [B, d] raw; `scaling_factor`: SAELens' norm_scaling_factor folded as from_pretrained does."""
    t = dict(t)
    if scaling_factor != 1.0:  # fold_activation_norm_scaling_factor
        t["W_enc"], t["W_dec"], t["b_dec"] = (t["W_enc"] * scaling_factor, t["W_dec"] / scaling_factor,
                                              t["b_dec"] / scaling_factor)
    arch = cfg.get("architecture", "standard")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "standard" and cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        f = gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = sae_in @ t["W_enc"] + t["b_enc"]
        if rescale:  # topk / batchtopk: select on pre * ||W_dec_j||
            pre = pre * t["W_dec"].norm(dim=-1)
        if arch == "standard":
            f = torch.relu(pre)
        elif arch == "jumprelu":
            f = torch.relu(pre) * (pre > t["threshold"])
        elif arch == "batchtopk":  # a training checkpoint at inference: its threshold
            f = torch.relu(pre) * (torch.relu(pre) > t["topk_threshold"])
        else:
            top = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    if rescale:
        f = f / t["W_dec"].norm(dim=-1)
    sf = t.get("scaling_factor", t.get("finetuning_scaling_factor"))
    if sf is not None:
        f = f * sf
    return f @ t["W_dec"] + t["b_dec"]


def write_saelens(path, cfg: dict, tensors: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))


def saelens_tensors(arch: str, seed: int, d: int = D, m: int = M) -> dict:
    g = _gen(seed)
    t = {"W_enc": _w(g, d, m), "W_dec": _w(g, m, d), "b_dec": _w(g, d, scale=1.0)}
    if arch == "gated":
        t.update(b_gate=_w(g, m), r_mag=_w(g, m), b_mag=_w(g, m))
    else:
        t["b_enc"] = _w(g, m)
    if arch == "jumprelu":
        t["threshold"] = torch.rand(m, generator=g) * 2
    if arch == "batchtopk":
        t["topk_threshold"] = torch.tensor(1.5)
    return t


V6 = {"dtype": "float32", "device": "cpu", "normalize_activations": "none", "reshape_activations": "none",
      "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post",
                   "sae_lens_version": "6.5.0"}}
SAELENS_CASES = {
    "standard": {"architecture": "standard"},
    "standard-no-b_dec-input": {"architecture": "standard", "apply_b_dec_to_input": False},
    "jumprelu": {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    "topk": {"architecture": "topk", "k": 6},
    "topk-rescaled": {"architecture": "topk", "k": 6, "rescale_acts_by_decoder_norm": True},
    "gated": {"architecture": "gated"},
    "batchtopk-training": {"architecture": "batchtopk", "k": 6.5, "rescale_acts_by_decoder_norm": True},
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_architectures_match_their_definition(tmp_path, case):
    cfg = {**V6, "d_in": D, "d_sae": M, **SAELENS_CASES[case]}
    tensors = saelens_tensors(cfg["architecture"], seed=1)
    write_saelens(tmp_path / case, cfg, tensors)
    foreign = read_foreign(tmp_path / case)
    assert detect_format(tmp_path / case) == "saelens" and foreign.hook == "layer1.resid_post"
    x = _raw(2)
    _check(foreign, x, lambda x: saelens_forward(cfg, tensors, x[:, 0])[:, None])
    codes = foreign.on_raw().encode(x)
    assert 0 < int((codes > 0).sum(1).float().mean()) < M  # sparse, not dead: the test can fail


def test_saelens_pre_v6_flat_config_with_finetuning_factor(tmp_path):
    cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "d_in": D, "d_sae": M, "hook_point": "blocks.3.hook_resid_pre", "model_name": "gpt2",
           "finetuning_scaling_factor": True, "normalize_activations": False}
    tensors = {**saelens_tensors("standard", seed=3),
               "scaling_factor": torch.rand(M, generator=_gen(4)) + 0.5}
    write_saelens(tmp_path / "old", cfg, tensors)
    foreign = read_foreign(tmp_path / "old")
    assert foreign.hook == "layer3.resid_pre" and foreign.dictionary.architecture == "topk"
    _check(foreign, _raw(5), lambda x: saelens_forward(cfg, tensors, x[:, 0])[:, None])


def test_saelens_expected_average_only_in_uses_the_given_factor(tmp_path):
    cfg = {**V6, "d_in": D, "d_sae": M, "architecture": "standard",
           "normalize_activations": "expected_average_only_in"}
    tensors = saelens_tensors("standard", seed=6)
    write_saelens(tmp_path / "ea", cfg, tensors)
    x = _raw(7)
    # without a factor: the weights read raw activations, as SAELens' load_from_disk applies them
    _check(read_foreign(tmp_path / "ea"), x, lambda x: saelens_forward(cfg, tensors, x[:, 0])[:, None])
    # with the release's norm_scaling_factor: as SAELens' from_pretrained folds it
    _check(read_foreign(tmp_path / "ea", input_scales=[0.25]), x,
           lambda x: saelens_forward(cfg, tensors, x[:, 0], scaling_factor=0.25)[:, None])


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_saelens_per_token_normalization_is_refused(tmp_path, norm):
    write_saelens(tmp_path / norm, {**V6, "d_in": D, "d_sae": M, "architecture": "standard",
                                    "normalize_activations": norm}, saelens_tensors("standard", 0))
    with pytest.raises(FormatError, match=f"{norm}.*per-token"):
        read_foreign(tmp_path / norm)


def test_saelens_unknown_tensor_is_refused(tmp_path):
    tensors = {**saelens_tensors("standard", 0), "W_skip": torch.zeros(D, D)}
    write_saelens(tmp_path / "t", {**V6, "d_in": D, "d_sae": M, "architecture": "standard"}, tensors)
    with pytest.raises(FormatError, match=r"unknown \['W_skip'\]"):
        read_foreign(tmp_path / "t")


def _our_sae(arch: str, seed: int) -> torch.nn.Module:
    spec = DictionarySpec(name=arch, architecture=arch, n_latents=M, k=5 if "topk" in arch else None,
                          seed=seed)
    d = build_dictionary(spec, 1, D, STORE_SCALES[:1])
    g = _gen(seed)
    with torch.no_grad():
        d.W_enc.copy_(_w(g, 1, D, M))
        d.b_enc.copy_(_w(g, M))
        d.b_dec.copy_(_w(g, 1, D))
        if arch == "batchtopk":
            d.threshold.fill_(0.4)
        if arch == "jumprelu":
            d.log_threshold.copy_((torch.rand(M, generator=g) + 0.1).log())
    return d.eval()


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_export_matches_the_format_and_round_trips(tmp_path, arch):
    ours = _our_sae(arch, seed=8)
    out = saelens.export(ours, tmp_path / arch, hook="layer1.resid_post", model_name="tiny")
    cfg = json.loads((out / "cfg.json").read_text())
    tensors = load_file(str(out / "sae_weights.safetensors"))
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(arch, arch)
    x = _raw(9)
    s = STORE_SCALES[0]
    ref_ours = _run(ours, x * s) / s  # our dictionary on store rows, in raw units
    _close(saelens_forward(cfg, tensors, x[:, 0])[:, None], ref_ours)
    back = saelens.read(out).on_store(STORE_SCALES[:1])
    _close(_run(back, x * s), _run(ours, x * s))


def test_crosscoder_export_to_saelens_is_refused(tmp_path):
    cc = build_dictionary(DictionarySpec(name="cc", architecture="relu", n_latents=M), 2, D)
    with pytest.raises(FormatError, match="crosscoder"):
        saelens.export(cc, tmp_path / "cc", hook="layer1.resid_post")


# ----------------------------------------------------------------------------------------------
# dictionary_learning: ae.pt (state dict) + config.json; forwards as in its dictionary classes
# ----------------------------------------------------------------------------------------------


def dl_state(cls: str, seed: int, n_layers: int = 2) -> dict:
    g = _gen(seed)
    lin = {"encoder.weight": _w(g, M, D), "encoder.bias": _w(g, M), "decoder.weight": _w(g, D, M)}
    if cls == "AutoEncoder":
        return {**lin, "bias": _w(g, D, scale=1.0)}
    if cls == "AutoEncoderNew":
        return {**lin, "decoder.bias": _w(g, D, scale=1.0)}
    if cls == "GatedAutoEncoder":
        return {"decoder_bias": _w(g, D, scale=1.0), "encoder.weight": _w(g, M, D), "r_mag": _w(g, M),
                "gate_bias": _w(g, M), "mag_bias": _w(g, M), "decoder.weight": _w(g, D, M)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": _w(g, D, M), "b_enc": _w(g, M), "W_dec": _w(g, M, D), "b_dec": _w(g, D, scale=1.0),
                "threshold": torch.rand(M, generator=g) * 2 - 0.2}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {**lin, "b_dec": _w(g, D, scale=1.0), "k": torch.tensor(5, dtype=torch.int),
                "threshold": torch.tensor(1.2)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {"W_enc": _w(g, D, M), "b_enc": _w(g, M), "W_dec": _w(g, M, D), "b_dec": _w(g, D, scale=1.0),
                "k": torch.tensor(5, dtype=torch.int), "threshold": torch.tensor(1.2),
                "group_sizes": torch.tensor([M // 2, M - M // 2])}
    cc = {"encoder.weight": _w(g, n_layers, D, M), "encoder.bias": _w(g, M),
          "decoder.weight": _w(g, n_layers, M, D), "decoder.bias": _w(g, n_layers, D, scale=1.0),
          "code_normalization_id": torch.tensor(1)}
    if cls == "BatchTopKCrossCoder":
        cc.update(k=torch.tensor(5, dtype=torch.int), threshold=torch.tensor(2.0))
    return cc


def dl_forward(cls: str, t: dict, x: torch.Tensor) -> torch.Tensor:
    """x [B, n, d] -> x_hat [B, n, d], as dictionary_learning's encode/decode (inference)."""
    relu = torch.relu
    if cls in ("CrossCoder", "BatchTopKCrossCoder"):
        f = relu(torch.einsum("bld,ldf->bf", x, t["encoder.weight"]) + t["encoder.bias"])
        if cls == "BatchTopKCrossCoder":
            f = f * ((f * t["decoder.weight"].norm(dim=2).sum(0)) > t["threshold"])
        return torch.einsum("bf,lfd->bld", f, t["decoder.weight"]) + t["decoder.bias"]
    x = x[:, 0]
    if cls == "AutoEncoder":
        f = relu((x - t["bias"]) @ t["encoder.weight"].T + t["encoder.bias"])
        out = f @ t["decoder.weight"].T + t["bias"]
    elif cls == "AutoEncoderNew":
        f = relu(x @ t["encoder.weight"].T + t["encoder.bias"])
        out = f @ t["decoder.weight"].T + t["decoder.bias"]
    elif cls == "GatedAutoEncoder":
        x_enc = (x - t["decoder_bias"]) @ t["encoder.weight"].T
        f = (x_enc + t["gate_bias"] > 0) * relu(t["r_mag"].exp() * x_enc + t["mag_bias"])
        out = f @ t["decoder.weight"].T + t["decoder_bias"]
    elif cls == "JumpReluAutoEncoder":
        pre = x @ t["W_enc"] + t["b_enc"]
        out = relu(pre * (pre > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    elif cls == "MatryoshkaBatchTopKSAE":
        post = relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
        out = (post * (post > t["threshold"])) @ t["W_dec"] + t["b_dec"]
    else:
        post = relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
        if cls == "BatchTopKSAE":
            f = post * (post > t["threshold"])
        else:
            top = post.topk(int(t["k"]), dim=-1)
            f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
        out = f @ t["decoder.weight"].T + t["b_dec"]
    return out[:, None]


DL_CLASSES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
              "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "CrossCoder", "BatchTopKCrossCoder"]


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_dictionary_learning_classes_match_their_definition(tmp_path, cls):
    t = dl_state(cls, seed=11)
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(t, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": cls, "layer": 2, "lm_name": "EleutherAI/pythia-70m",
        "submodule_name": "resid_post_layer_2"},
        "buffer": {"d_submodule": D}}))
    foreign = read_foreign(folder)
    assert detect_format(folder) == "dictionary_learning" and foreign.hook == "layer2.resid_post"
    n = 2 if "CrossCoder" in cls else 1
    x = _raw(12, n_models=n)
    _check(foreign, x, lambda x: dl_forward(cls, t, x))
    fired = (foreign.on_raw().encode(x) > 0).float().mean()
    assert 0 < fired < 1


def test_dictionary_learning_crosscoder_with_other_code_normalization_is_refused(tmp_path):
    t = {**dl_state("BatchTopKCrossCoder", 0), "code_normalization_id": torch.tensor(2)}
    torch.save(t, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKCrossCoder"}}))
    with pytest.raises(FormatError, match="code normalization id 2"):
        read_foreign(tmp_path)


# ----------------------------------------------------------------------------------------------
# The Gemma-2-2b model-diffing crosscoder: cfg.json + cc_weights.pt
# ----------------------------------------------------------------------------------------------


def cc_weights(seed: int, d: int = D, m: int = M, n: int = 2) -> dict:
    g = _gen(seed)
    return {"W_enc": _w(g, n, d, m), "W_dec": _w(g, m, n, d), "b_enc": _w(g, m), "b_dec": _w(g, n, d)}


def cc_forward(t: dict, x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """The release's forward on normalized inputs (x * factor per model), mapped back to raw units."""
    c = torch.tensor(factors)[None, :, None]
    acts = torch.relu(torch.einsum("bnd,ndh->bh", x * c, t["W_enc"]) + t["b_enc"])
    return (torch.einsum("bh,hnd->bnd", acts, t["W_dec"]) + t["b_dec"]) / c


CC_CFG = {"d_in": D, "dict_size": M, "hook_point": "blocks.1.hook_resid_post", "model_name": "gemma-2-2b",
          "enc_dtype": "fp32", "l1_coeff": 2, "dec_init_norm": 0.08, "seed": 49}


def test_gemma_crosscoder_matches_its_definition(tmp_path):
    t = cc_weights(seed=13)
    torch.save(t, tmp_path / "cc_weights.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(CC_CFG))
    factors = [0.25, 0.6]
    foreign = read_foreign(tmp_path, input_scales=factors)
    assert detect_format(tmp_path) == "gemma_crosscoder" and foreign.hook == "layer1.resid_post"
    _check(foreign, _raw(14, n_models=2), lambda x: cc_forward(t, x, factors))
    with pytest.raises(FormatError, match="normalization factors"):
        read_foreign(tmp_path)  # the release does not record them: they must be given
    # the trainer's own saves: <version>.pt + <version>_cfg.json
    torch.save(t, tmp_path / "3.pt")
    (tmp_path / "3_cfg.json").write_text(json.dumps(CC_CFG))
    _check(read_foreign(tmp_path / "3.pt", "gemma_crosscoder", [1.0]), _raw(15, 2),
           lambda x: cc_forward(t, x, [1.0, 1.0]))


class _Payload:
    """Unpickling this runs a shell command: what a malicious weights file does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_pt_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({**cc_weights(0), "extra": _Payload(marker)}, tmp_path / "cc_weights.pt")
    (tmp_path / "cfg.json").write_text(json.dumps(CC_CFG))
    with pytest.raises(FormatError, match="refused: it holds pickled Python objects"):
        read_foreign(tmp_path, input_scales=[1.0])
    assert not marker.exists()


def test_unknown_folder_names_the_formats(tmp_path):
    with pytest.raises(FormatError, match="SAELens folder .* dictionary_learning"):
        detect_format(tmp_path)


# ----------------------------------------------------------------------------------------------
# Stage three on imported dictionaries: a tiny cached experiment (float32 store)
# ----------------------------------------------------------------------------------------------

MODELS = ["llama-s0", "llama-s1"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("formats")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=150, d_model=32, n_layers=2)
    path = write_config(d / "exp.toml", fx, n_tokens=1024, hooks=((1, "resid_post"),),
                        storage_dtype="float32", store=str(d / "store"), name="formats")
    cfg = load_config(path)
    run_cache(cfg, log=lambda *a: None, progress=False)
    return {"dir": d, "path": path, "cfg": cfg}


def _validation_rows(cfg, dict_dir):
    """The rows stage three evaluates (validation sequences, positions >= 1): raw [N, n, d], scales."""
    meta = json.loads((dict_dir / "config.json").read_text())
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    arrays = [S.open_activation_array(root, p) for p in meta["arrays"]]
    ctx, first = ts.context_length, ts.n_train_sequences
    rows = [S.read_rows(a, first * ctx, ts.n_sequences * ctx).float().view(-1, ctx, a.array.shape[1])[:, 1:]
            .reshape(-1, a.array.shape[1]) for a in arrays]
    scales = torch.tensor([a.scale for a in arrays])
    return torch.stack(rows, 1) / scales[None, :, None], scales


def test_imported_sae_and_crosscoder_through_stage_three(experiment, capsys):
    cfg, d = experiment["cfg"], experiment["dir"]
    sae_cfg = {**V6, "d_in": 32, "d_sae": 64, "architecture": "jumprelu"}
    sae_t = saelens_tensors("jumprelu", seed=21, d=32, m=64)
    sae_t["threshold"] = sae_t["threshold"] * 0.2
    write_saelens(d / "foreign-sae", sae_cfg, sae_t)
    cc_t = cc_weights(seed=22, d=32, m=64)
    (d / "foreign-cc").mkdir()
    torch.save(cc_t, d / "foreign-cc" / "cc_weights.pt")
    (d / "foreign-cc" / "cfg.json").write_text(json.dumps({**CC_CFG, "d_in": 32, "dict_size": 64}))
    factors = [0.5, 0.3]

    config = str(experiment["path"])
    assert cli_main(["import-dictionary", config, str(d / "foreign-sae"), "--models", "llama-s0"]) == 0
    assert cli_main(["import-dictionary", config, str(d / "foreign-cc"),
                     "--input-scales", ",".join(map(str, factors)), "--name", "cc"]) == 0
    sae_dir, cc_dir = d / "runs" / "formats" / "foreign-sae", d / "runs" / "formats" / "cc"
    meta = json.loads((sae_dir / "config.json").read_text())
    assert meta["imported_from"]["format"] == "saelens" and meta["hook"] == "layer1.resid_post"
    assert cli_main(["eval", config, "--dictionary", str(sae_dir), "--dictionary", str(cc_dir),
                     "--no-progress"]) == 0
    capsys.readouterr()

    ev = d / "runs" / "formats" / "eval"
    for dict_dir, reference in [
        (sae_dir, lambda x: saelens_forward(sae_cfg, sae_t, x[:, 0])[:, None]),
        (cc_dir, lambda x: cc_forward(cc_t, x, factors)),
    ]:
        splice = json.loads((ev / dict_dir.name / "splice.json").read_text())
        x_raw, scales = _validation_rows(cfg, dict_dir)
        err = ((x_raw - reference(x_raw)) * scales[None, :, None]).pow(2)  # in store units
        per_model = splice["metrics"]["per_model"]
        for i, name in enumerate(json.loads((dict_dir / "config.json").read_text())["models"]):
            assert per_model[name]["mse"] == pytest.approx(float(err[:, i].sum(-1).mean()), rel=1e-4)
        assert splice["metrics"]["mse"] == pytest.approx(float(err.sum((1, 2)).mean()), rel=1e-4)
        assert 0 < splice["metrics"]["l0"] < 64
        assert (ev / dict_dir.name / "diff.json").exists() and (ev / dict_dir.name / "latents.html").exists()
    assert (ev / "cc" / "relative_norms.png").stat().st_size > 0

    # export the imported SAE back to SAELens: the same raw reconstructions as the original files
    assert cli_main(["export-saelens", str(sae_dir), str(d / "exported")]) == 0
    exp_cfg = json.loads((d / "exported" / "cfg.json").read_text())
    exp_t = load_file(str(d / "exported" / "sae_weights.safetensors"))
    x = _raw(23, d=32)[:, 0]
    _close(saelens_forward(exp_cfg, exp_t, x), saelens_forward(sae_cfg, sae_t, x))
    assert load_dictionary(sae_dir).scales == [float(s) for s in _validation_rows(cfg, sae_dir)[1]]


def test_import_refuses_a_dictionary_of_another_width_or_hook(experiment, capsys):
    d, config = experiment["dir"], str(experiment["path"])
    write_saelens(d / "wide", {**V6, "d_in": D, "d_sae": M, "architecture": "standard"},
                  saelens_tensors("standard", 0))
    assert cli_main(["import-dictionary", config, str(d / "wide"), "--models", "llama-s0"]) == 2
    assert "d_model 12" in capsys.readouterr().err
    hooked = {**V6, "d_in": 32, "d_sae": M, "architecture": "standard",
              "metadata": {"hook_name": "blocks.1.hook_mlp_out"}}
    write_saelens(d / "mlp", hooked, saelens_tensors("standard", 0, d=32))
    assert cli_main(["import-dictionary", config, str(d / "mlp"), "--models", "llama-s0"]) == 2
    assert "--hook" in capsys.readouterr().err
