"""pipeline.models and the modules it composes (hooks, checkpoints, identity, tokenizer) on tiny
random-weight checkpoints: hooking, loading from every source, identity, tokenizers.

Everything is offline: models are built by mdiff.tiny, the hub is a hand-made local cache, and a
GGUF file is written here with the `gguf` package.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mdiff.tiny import ARCHITECTURES, build_fixture, make_tokenizer
from pipeline import models as M
from pipeline.checkpoints import ModelLoadError
from pipeline.config import HookSpec, ModelSpec
from pipeline.hooks import SUPPORTED_SITES, UnsupportedModelError, capture, decoder_layers, editing_residual
from pipeline.identity import model_identity, model_key
from pipeline.models import load_model, resolve_device, resolve_dtype
from pipeline.tokenizer import (
    TokenizerMismatchError,
    check_same_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    vocabulary_fingerprint,
)

N_LAYERS, D_MODEL = 3, 32
COMMIT_STEP, COMMIT_MAIN = "1" * 40, "2" * 40


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("tiny"), archs=ARCHITECTURES, n_docs=40,
                         d_model=D_MODEL, n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def loaded(fixture):
    """Each tiny model loaded once per module (loading is the slow part)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            path = fixture["models"][f"{arch}-s0"]
            cache[arch] = load_model(ModelSpec(name=arch, path=str(path)), device="cpu")
        return cache[arch]

    return get


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 300, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the mask must reach the layers unchanged
    return ids, mask


def _reference(model, ids, mask):
    with torch.inference_mode():
        return model(ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states


def _expected(ref, hook: HookSpec):
    return ref[hook.layer + (hook.site == "resid_post")]


# ------------------------------------------------------------------------------------------------
# capture
# ------------------------------------------------------------------------------------------------

# resid_post of the last layer is excluded: output_hidden_states[-1] has the final norm applied.
COMPARABLE = [HookSpec(layer, site) for layer in range(N_LAYERS) for site in SUPPORTED_SITES
              if not (layer == N_LAYERS - 1 and site == "resid_post")]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_capture_equals_output_hidden_states(loaded, arch):
    model = loaded(arch).model
    ids, mask = _batch()
    ref = _reference(model, ids, mask)
    with torch.inference_mode():
        together = capture(model, ids, COMPARABLE, attention_mask=mask)
        alone = {h: capture(model, ids, [h], attention_mask=mask)[h] for h in COMPARABLE}
    assert list(together) == COMPARABLE
    for hook in COMPARABLE:
        assert torch.equal(together[hook], _expected(ref, hook)), hook.label
        assert torch.equal(alone[hook], _expected(ref, hook)), hook.label


def _in_memory_model(model_type: str):
    """Registry entries mdiff.tiny does not build; from_config is enough to check their hooks."""
    import transformers as T

    ids = dict(vocab_size=64, bos_token_id=0, eos_token_id=1)
    common = dict(hidden_size=32, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, **ids)
    config = {
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=N_LAYERS, n_head=4, **ids),
        "mistral": lambda: T.MistralConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**common),
        "olmo2": lambda: T.Olmo2Config(**common),
        "gemma3_text": lambda: T.Gemma3TextConfig(head_dim=8, **common),
    }[model_type]()
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "mistral", "qwen2", "olmo2", "gemma3_text"])
def test_capture_other_registered_architectures(model_type):
    model = _in_memory_model(model_type)
    assert model.config.model_type == model_type
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    ref = _reference(model, ids, torch.ones_like(ids))
    with torch.inference_mode():
        got = capture(model, ids, COMPARABLE)
    for hook in COMPARABLE:
        assert torch.equal(got[hook], _expected(ref, hook)), hook.label


@pytest.mark.parametrize("arch", ["llama", "bloom", "gpt_neox"])
def test_last_layer_resid_post_is_before_final_norm(loaded, arch):
    lm = loaded(arch)
    ids, mask = _batch(1)
    seen = {}
    handle = decoder_layers(lm.model)[-1].register_forward_hook(
        lambda _m, _a, out: seen.setdefault("out", out if torch.is_tensor(out) else out[0]))
    try:
        with torch.inference_mode():
            got = capture(lm.model, ids, [HookSpec(N_LAYERS - 1, "resid_post")], attention_mask=mask)
    finally:
        handle.remove()
    assert torch.equal(got[HookSpec(N_LAYERS - 1, "resid_post")], seen["out"])


def _call_recorder(modules: dict):
    """Records modules whose forward completed (a pre-hook would also see the one capture stops in)."""
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda *_a, n=name: calls.append(n))
               for name, m in modules.items()]
    return calls, handles


@pytest.mark.parametrize("arch", ["llama", "bloom", "gemma2"])
@pytest.mark.parametrize("hooks, first_skipped", [
    ([HookSpec(0, "resid_pre"), HookSpec(1, "resid_post")], 2),
    ([HookSpec(1, "resid_pre")], 1),  # only the input of layer 1 is needed: layer 1 never runs
    ([HookSpec(0, "resid_post"), HookSpec(0, "resid_pre")], 1),
])
def test_capture_stops_after_deepest_hook(loaded, arch, hooks, first_skipped):
    model = loaded(arch).model
    layers = decoder_layers(model)
    watched = {f"layer{i}": layers[i] for i in range(N_LAYERS)}
    watched["lm_head"] = model.get_output_embeddings()
    calls, handles = _call_recorder(watched)
    try:
        with torch.inference_mode():
            out = capture(model, _batch()[0], hooks)
    finally:
        for h in handles:
            h.remove()
    assert set(out) == set(hooks)
    assert calls == [f"layer{i}" for i in range(first_skipped)]


def test_capture_removes_its_hooks_even_on_error(loaded):
    model = loaded("llama").model
    layers = decoder_layers(model)

    def counts():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]

    before = counts()
    capture(model, _batch()[0], [HookSpec(0, "resid_pre"), HookSpec(2, "resid_post")])
    assert counts() == before
    with pytest.raises(Exception):
        capture(model, torch.full((1, 4), 10_000), [HookSpec(1)])  # token id out of range
    assert counts() == before


def test_capture_works_with_grad_enabled(loaded):
    model = loaded("olmo").model
    out = capture(model, _batch()[0], [HookSpec(1, "resid_pre")])
    assert not out[HookSpec(1, "resid_pre")].requires_grad


def test_layer_out_of_range_is_a_clear_error(loaded):
    lm = loaded("llama")
    with pytest.raises(ValueError, match=r"has 3 layers.*0\.\.2, got 3") as info:
        capture(lm.model, _batch()[0], [HookSpec(0), HookSpec(3, "resid_pre")])
    assert str(lm.spec.path) in str(info.value)
    with pytest.raises(ValueError, match="got -1"):
        capture(lm.model, _batch()[0], [HookSpec(-1)])
    with pytest.raises(ValueError, match="unknown site"):
        capture(lm.model, _batch()[0], [HookSpec(0, "attn_out")])


# ------------------------------------------------------------------------------------------------
# editing the residual stream
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "bloom", "gpt_neox"])
@pytest.mark.parametrize("site", SUPPORTED_SITES)
def test_editing_sees_what_capture_reads_and_replaces_it(loaded, arch, site):
    """The edit gets exactly the tensor capture returns; what it returns is what the model reads on."""
    model = loaded(arch).model
    ids, mask = _batch()
    hook = HookSpec(1, site)
    seen = []
    with torch.inference_mode():
        plain = model(ids, attention_mask=mask, use_cache=False).logits
        with editing_residual(model, hook, lambda h: seen.append(h) or h):
            kept = model(ids, attention_mask=mask, use_cache=False).logits
        with editing_residual(model, hook, torch.zeros_like):
            zeroed = model(ids, attention_mask=mask, use_cache=False).logits
        assert torch.equal(seen[0], capture(model, ids, [hook], attention_mask=mask)[hook])
        after = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(kept, plain) and torch.equal(after, plain)
    assert not torch.allclose(zeroed, plain)


def test_editing_removes_its_hook_even_on_error(loaded):
    model = loaded("llama").model
    layers = decoder_layers(model)

    def counts():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]

    before = counts()
    with pytest.raises(RuntimeError, match="inside"):
        with editing_residual(model, HookSpec(0, "resid_pre"), lambda h: h):
            assert counts() != before
            raise RuntimeError("inside")
    assert counts() == before
    with pytest.raises(ValueError, match="unknown site"):
        with editing_residual(model, HookSpec(0, "attn_out"), lambda h: h):
            pass
    assert counts() == before


# ------------------------------------------------------------------------------------------------
# architectures
# ------------------------------------------------------------------------------------------------


def test_unsupported_architecture_is_refused_before_weights(tmp_path):
    from transformers import GPTJConfig

    d = tmp_path / "gptj"
    GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=100).save_pretrained(d)  # no weights at all
    with pytest.raises(UnsupportedModelError) as info:
        load_model(ModelSpec(name="jay", path=str(d)))
    message = str(info.value)
    assert "'jay'" in message and "'gptj'" in message
    for supported in ("gpt_neox", "llama", "bloom", "gemma2", "resid_pre", "resid_post"):
        assert supported in message


def test_decoder_layers_refuses_unknown_models():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                     num_attention_heads=2, vocab_size=50, word_embed_proj_dim=16))
    with pytest.raises(UnsupportedModelError, match=r"'opt'.*supported architectures.*llama"):
        decoder_layers(model)
    with pytest.raises(UnsupportedModelError):
        capture(model, torch.zeros(1, 3, dtype=torch.long), [HookSpec(0)])


# ------------------------------------------------------------------------------------------------
# loading from a directory
# ------------------------------------------------------------------------------------------------


def test_load_from_directory(loaded, fixture):
    lm = loaded("gemma")
    assert (lm.d_model, lm.n_layers, lm.architecture) == (D_MODEL, N_LAYERS, "gemma")
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.identity["source"] == "dir" and lm.identity["name"] == "gemma-s0"
    assert lm.identity["dtype"] == "float32"
    assert lm.key == model_key(lm.identity) and lm.key.startswith("gemma-s0-")
    tok = load_tokenizer(lm.spec)
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(fixture["tokenizer"])


def test_load_in_bfloat16(fixture):
    path = str(fixture["models"]["llama-s0"])
    lm = load_model(ModelSpec(name="b", path=path, dtype="bfloat16"), device="cpu")
    assert lm.dtype == torch.bfloat16 and lm.identity["dtype"] == "bfloat16"
    out = capture(lm.model, _batch()[0], [HookSpec(1)])
    assert out[HookSpec(1)].dtype == torch.bfloat16


def test_missing_or_broken_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'gone'.*does not exist"):
        load_model(ModelSpec(name="gone", path=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"'broken'.*config.*Fix:"):
        load_model(ModelSpec(name="broken", path=str(broken)))


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve"):
        model_identity(ModelSpec(name="x", path="."), "auto")


# ------------------------------------------------------------------------------------------------
# loading from GGUF
# ------------------------------------------------------------------------------------------------


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved rotary halves); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """A float32 GGUF of a llama directory, metadata and BPE tokenizer included, as llama.cpp writes it."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_vocab_size(cfg["vocab_size"])

    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = [""] * cfg["vocab_size"]
    for token, i in {**tok["model"]["vocab"], **added}.items():
        tokens[i] = token
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        a = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _llama_permute(a, n_head)
        elif name.endswith("k_proj.weight"):
            a = _llama_permute(a, n_kv)
        w.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module")
def gguf_file(fixture, tmp_path_factory):
    pytest.importorskip("gguf")
    return write_llama_gguf(fixture["models"]["llama-s0"], tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_load_from_gguf(gguf_file, loaded, fixture):
    lm = load_model(ModelSpec(name="g", gguf=str(gguf_file)), device="cpu")
    assert lm.architecture == "llama" and (lm.d_model, lm.n_layers) == (D_MODEL, N_LAYERS)
    assert lm.identity["source"] == "gguf" and lm.identity["name"] == "tiny.gguf"
    assert lm.key.startswith("tiny.gguf-")
    ids, mask = _batch()
    hooks = [HookSpec(0, "resid_post"), HookSpec(2, "resid_post")]
    with torch.inference_mode():
        got = capture(lm.model, ids, hooks, attention_mask=mask)
        want = capture(loaded("llama").model, ids, hooks, attention_mask=mask)
    for hook in hooks:  # float32 weights survive the GGUF round trip exactly
        assert torch.equal(got[hook], want[hook])

    tok = load_tokenizer(lm.spec)
    text = "The old king walked to the river at night. <|eos|>"
    assert tok(text).input_ids == fixture["tokenizer"](text).input_ids


# ------------------------------------------------------------------------------------------------
# loading from the hub (a hand-made local cache, offline)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub_cache(fixture, tmp_path_factory):
    """models--org--tiny with refs step512 -> llama snapshot and main -> olmo snapshot."""
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    repo = cache / "models--org--tiny"
    for commit, arch in ((COMMIT_STEP, "llama"), (COMMIT_MAIN, "olmo")):
        shutil.copytree(fixture["models"][f"{arch}-s0"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "step512").write_text(COMMIT_STEP)
    (repo / "refs" / "main").write_text(COMMIT_MAIN)
    return cache


@pytest.fixture
def hub(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    return hub_cache


def test_load_hub_revision_from_local_cache(hub, loaded):
    spec = ModelSpec(name="a", repo="org/tiny", revision="step512")
    lm = load_model(spec, device="cpu")
    assert lm.architecture == "llama"
    assert lm.identity == {"source": "hub", "repo": "org/tiny", "revision": "step512",
                           "commit": COMMIT_STEP, "dtype": "float32"}
    assert lm.identity == model_identity(spec, "float32")
    assert re.fullmatch(r"org--tiny@step512-[0-9a-f]{10}", lm.key)
    ids = _batch()[0]
    assert torch.equal(capture(lm.model, ids, [HookSpec(1)])[HookSpec(1)],
                       capture(loaded("llama").model, ids, [HookSpec(1)])[HookSpec(1)])
    assert load_tokenizer(spec).bos_token_id == 0


def test_hub_default_revision_and_commit_revision(hub):
    main = load_model(ModelSpec(name="m", repo="org/tiny"), device="cpu")
    assert main.architecture == "olmo" and main.identity["commit"] == COMMIT_MAIN
    assert main.identity["revision"] == "main"
    pinned = model_identity(ModelSpec(name="p", repo="org/tiny", revision=COMMIT_STEP), "float32")
    assert pinned["commit"] == COMMIT_STEP


def test_explicit_cache_dir(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    spec = ModelSpec(name="a", repo="org/tiny", revision="step512")
    assert model_identity(spec, "float32", cache_dir=hub_cache)["commit"] == COMMIT_STEP
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        model_identity(spec, "float32")


def test_unknown_hub_revision(hub):
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSpec(name="late", repo="org/tiny", revision="step999"))
    message = str(info.value)
    for part in ("'late'", "'org/tiny'", "'step999'", "step143000", "main, step512", "HF_HUB_OFFLINE"):
        assert part in message, part
    with pytest.raises(ModelLoadError, match="'step999'"):
        load_tokenizer(ModelSpec(name="late", repo="org/tiny", revision="step999"))


def test_unknown_hub_repo(hub):
    with pytest.raises(ModelLoadError, match=r"'org/absent'.*not in the local hub cache.*hf download"):
        load_model(ModelSpec(name="x", repo="org/absent", revision="step1"))


# ------------------------------------------------------------------------------------------------
# identity
# ------------------------------------------------------------------------------------------------


def test_identity_ignores_location_but_not_weights_or_dtype(fixture, tmp_path):
    src = fixture["models"]["llama-s0"]
    a = shutil.copytree(src, tmp_path / "a" / "ckpt")
    b = shutil.copytree(src, tmp_path / "elsewhere" / "ckpt")
    (b / "README.md").write_text("not a weight file")
    ida = model_identity(ModelSpec(name="a", path=str(a)), "float32")
    idb = model_identity(ModelSpec(name="b", path=str(b)), torch.float32)
    assert ida == idb and model_key(ida) == model_key(idb)
    assert str(tmp_path) not in json.dumps(ida)

    bf16 = model_identity(ModelSpec(name="a", path=str(a)), "bfloat16")
    assert model_key(bf16) != model_key(ida)

    weights = b / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    assert model_key(model_identity(ModelSpec(name="b", path=str(b)), "float32")) != model_key(ida)


def test_model_key_is_filesystem_safe():
    identity = {"source": "hub", "repo": "Some Org/odd:name" + "x" * 80, "revision": "../step 1",
                "commit": "0" * 40, "dtype": "bfloat16"}
    key = model_key(identity)
    assert re.fullmatch(r"[A-Za-z0-9._@-]+", key)
    assert len(key) <= 71 and not key.startswith(".")
    assert key == model_key(dict(reversed(list(identity.items()))))
    pythia = {"source": "hub", "repo": "EleutherAI/pythia-1b", "revision": "step512",
              "commit": "a" * 40, "dtype": "float32"}
    assert re.fullmatch(r"EleutherAI--pythia-1b@step512-[0-9a-f]{10}", model_key(pythia))


def test_keys_and_fingerprints_are_pinned(tmp_path):
    """Ids already written into stores: a dir and a GGUF file of known bytes, and a tokenizer
    without a backend, give the values the original pipeline.models gave (before the split into
    hooks, checkpoints, identity and tokenizer)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "m.gguf").write_bytes(b"gguf bytes")
    directory = model_identity(ModelSpec(name="x", path=str(ckpt)), "float32")
    assert directory["weights_sha256"] == "800d17785f28dc789dc01b03d9fba9b88ecd57d57956c04f75641289811d8551"
    assert model_key(directory) == "ckpt-553cb00d2b"
    gguf = model_identity(ModelSpec(name="y", gguf=str(tmp_path / "m.gguf")), "bfloat16")
    assert gguf["weights_sha256"] == "241fc5b8e484a7126cbdfd559276712df0155c53936f4d0a26b6fe09512aced4"
    assert model_key(gguf) == "m.gguf-e44785c63f"
    pythia = {"source": "hub", "repo": "EleutherAI/pythia-1b", "revision": "step512",
              "commit": "a" * 40, "dtype": "float32"}
    assert model_key(pythia) == "EleutherAI--pythia-1b@step512-44103f714f"

    class Tok:  # no backend_tokenizer: fingerprinted by its class name and vocabulary
        bos_token_id, eos_token_id, pad_token_id = 0, 1, None
        chat_template = "{{ messages }}"

        def get_vocab(self):
            return {"b": 1, "a": 0, "\u00e9": 2}

    assert tokenizer_fingerprint(Tok()) == "92f6972531bf813a911013e595dddb4d4a5f07719c71f3f83e74eaa4fffcd617"
    assert vocabulary_fingerprint(Tok()) == "a8cdd63e74e70876a6a595fb353f15b02d4323f9013fbe2b08c75f2cf2236095"


def test_models_still_names_what_the_stages_use():
    """`from pipeline import models as M` reaches every name the stages call through it."""
    for name in ("capture", "decoder_layers", "check_architecture", "DECODER_LAYER_PATHS", "SUPPORTED_SITES",
                 "UnsupportedModelError", "ModelLoadError", "TokenizerMismatchError", "LoadedModel",
                 "load_model", "preflight", "resolve_device", "resolve_dtype", "model_identity", "model_key",
                 "load_tokenizer", "tokenizer_fingerprint", "vocabulary_fingerprint", "check_same_tokenizer"):
        assert hasattr(M, name), name
    assert M.capture is capture and M.model_key is model_key and M.ModelLoadError is ModelLoadError


def test_directory_without_weights_has_no_identity(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        model_identity(ModelSpec(name="empty", path=str(tmp_path)), "float32")


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------


def test_tokenizer_fingerprint(fixture, tmp_path):
    from transformers import AutoTokenizer

    tok = fixture["tokenizer"]
    tok.save_pretrained(tmp_path / "one")
    tok.save_pretrained(tmp_path / "two")
    one = AutoTokenizer.from_pretrained(tmp_path / "one")
    two = AutoTokenizer.from_pretrained(tmp_path / "two")
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(two) == tokenizer_fingerprint(tok)
    one(["a b", "the king said"], padding=True, truncation=True, max_length=3)  # sets backend state
    assert tokenizer_fingerprint(one) == tokenizer_fingerprint(two)
    check_same_tokenizer([("one", one), ("two", two)])

    two.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(two) != tokenizer_fingerprint(one)


def test_a_chat_version_naming_another_end_token_is_accepted_with_a_note(fixture, tmp_path):
    """Base and chat models of one family (Llama-3.1-8B and -Instruct) share the vocabulary but
    name different end-of-text tokens: the same ids mean the same tokens, so that is no mismatch."""
    from transformers import AutoTokenizer

    fixture["tokenizer"].save_pretrained(tmp_path / "chat")
    base, chat = fixture["tokenizer"], AutoTokenizer.from_pretrained(tmp_path / "chat")
    chat.eos_token = chat.pad_token  # another token of the same vocabulary as end of turn
    chat.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    assert chat.eos_token_id != base.eos_token_id
    assert tokenizer_fingerprint(chat) != tokenizer_fingerprint(base)
    assert vocabulary_fingerprint(chat) == vocabulary_fingerprint(base)
    assert base("the king said")["input_ids"] == chat("the king said")["input_ids"]
    notes = check_same_tokenizer([("base", base), ("chat", chat)])
    assert len(notes) == 1 and "'base' and 'chat' share a vocabulary" in notes[0]
    assert "different special tokens" in notes[0]


def test_different_tokenizers_are_refused(fixture):
    other = make_tokenizer(["zebra quantum xylophone " * 3, "completely different words here"] * 20)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(fixture["tokenizer"])
    named = [("base", fixture["tokenizer"]), ("same", fixture["tokenizer"]), ("odd", other)]
    with pytest.raises(TokenizerMismatchError) as info:
        check_same_tokenizer(named)
    message = str(info.value)
    assert "'base'" in message and "'odd'" in message and "'same'" not in message
    assert "must share a tokenizer" in message and "vocab sizes" in message
