"""Training and evaluating on caches imported with `mdiff import-cache`.

A config names the imported token set (`[tokens] tokenset`) and each model's import name
(`imported`); the trainer must then read exactly the imported rows (times the import's scale),
keep to the token set's validation split, and `mdiff eval` must refuse to splice a model whose
weights the config does not give, while splicing one whose weights it does give.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evals.run import run_eval
from evals.splice import SpliceError
from mdiff.cli import IMPORTED_CONFIG_HEADER
from mdiff.cli import main as cli_main
from mdiff.config import load_config, parse_config, write_config
from mdiff.tiny import make_corpus, make_model, make_tokenizer
from pipeline import import_cache as IC
from pipeline import store as S
from pipeline.typed_config import ConfigError
from tests.interop.foreign_caches import CTX, D, write_dl_cache
from tests.interop.foreign_caches import activations as _acts
from trainer import train as T

N_SEQ, N_VAL = 40, 4  # validation_fraction 0.1
N_TRAIN_ROWS = (N_SEQ - N_VAL) * CTX
TS = "ts-0123456789abcdef"


def train_section(models: list[str], *, steps: int = 4, **extra) -> dict:
    """A [train] section (write_config data): one small L1 SAE or crosscoder, `extra` more keys."""
    return {"models": models, "batch_size": 32, "steps": steps, "lr": 1e-3, "lr_warmup_steps": 1, "log_every": 2,
            "eval_every": steps, "eval_batches": 1, "checkpoint_every": steps, "buffer_tokens": 128,
            "read_threads": 1, "device": "cpu", **extra,
            "dictionaries": [{"name": "relu", "architecture": "relu", "n_latents": 32, "l1_coefficient": 0.01}]}


def quiet(*_):
    pass


def _import(src, store, model, **kw):
    kw = {"validation_fraction": 0.1, "storage_dtype": "float32", "chunk_rows": 32, "shard_rows": 64,
          "scale_sample_tokens": 100, "progress": False, "log": quiet, **kw}
    return IC.import_cache(src, str(store), model=model, **kw)


def test_printed_config_trains_on_exactly_the_imported_rows(tmp_path, capsys):
    acts = _acts(N_SEQ * CTX, seed=20)
    tokens = torch.randint(0, 300, (N_SEQ * CTX,), generator=torch.Generator().manual_seed(21))
    src = write_dl_cache(tmp_path / "cache", acts, [160, 160], tokens=tokens,
                         ranges=torch.arange(0, N_SEQ * CTX + 1, CTX))
    store = tmp_path / "store"
    assert cli_main(["import-cache", str(src), "--store", str(store), "--model", "base",
                     "--validation-fraction", "0.1", "--storage-dtype", "float32", "--no-progress"]) == 0
    snippet = tomllib.loads(capsys.readouterr().out.split(IMPORTED_CONFIG_HEADER)[1])  # TOML as printed
    config = write_config(tmp_path / "imported.toml",
                          {"name": "imported", "store": str(store), **snippet, "train": train_section(["base"])})
    assert cli_main(["train", str(config), "--no-progress"]) == 0

    cfg = load_config(config)
    _, ts, _, names, arrays = T.open_arrays(cfg, cfg.train)
    [arr] = arrays
    assert names == ["base"] and ts.id == cfg.tokens.tokenset and arr.attrs["model"]["source"] == "imported"
    # the trainer's batches are the imported rows times the import's scale, training rows only
    loader = T.make_loader(arrays, ts, cfg.train, "train", "cpu")
    rows = loader.epoch_rows(0)
    assert torch.equal(next(iter(loader))[:, 0].float(), acts[rows[:32]] * arr.scale)
    usable = {r for r in range(N_TRAIN_ROWS) if r % CTX}  # position 0 skipped by default
    assert len(set(rows.tolist())) == len(rows) and set(rows.tolist()) <= usable
    assert len(rows) == len(usable) // 32 * 32
    val = T.make_loader(arrays, ts, cfg.train, "validation", "cpu")
    assert set(val.epoch_rows(0).tolist()) == {r for r in range(N_TRAIN_ROWS, N_SEQ * CTX) if r % CTX}
    meta = json.loads((tmp_path / "runs" / "imported" / "relu" / "config.json").read_text())
    assert (meta["tokenset_id"], meta["arrays"], meta["scales"]) == (ts.id, [arr.path], [arr.scale])

    # a weightless model trains but cannot be spliced
    assert cli_main(["eval", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "splicing needs the model weights" in err and "give path, repo or gguf" in err
    # naming what is not in the store says what is there
    wrong = dataclasses.replace(cfg, models=[dataclasses.replace(cfg.models[0], imported="nope")])
    with pytest.raises(S.IncompleteError, match=r"no array imported as 'nope'.*imported there at "
                                                r"layer1.resid_post: 'base'"):
        T.open_arrays(wrong, cfg.train)
    absent = dataclasses.replace(cfg, tokens=dataclasses.replace(cfg.tokens, tokenset=TS))
    with pytest.raises(ConfigError, match=f"tokens.tokenset: {TS} is not a complete token set.*{ts.id}"):
        T.open_arrays(absent, cfg.train)
    # mdiff cache has nothing to build for a named token set
    assert cli_main(["cache", str(config), "--no-progress"]) == 2
    assert "tokens.tokenset: mdiff cache builds a token set" in capsys.readouterr().err


def test_rows_without_sequences_crosscoder_needs_include_first_position(tmp_path):
    a, b = _acts(200, seed=22), _acts(200, seed=23) * 2
    first = _import(write_dl_cache(tmp_path / "a", a, [200], name="layer_3"), tmp_path / "store", "a",
                    hook="layer3.resid_pre")
    _import(write_dl_cache(tmp_path / "b", b, [120, 80], name="layer_3"), tmp_path / "store", "b",
            hook="layer3.resid_pre", tokenset=first.tokenset_id)

    def config(**extra):
        return load_config(write_config(tmp_path / "cc.toml", {
            "name": "cc", "store": str(tmp_path / "store"),
            "models": [{"name": "a", "imported": "a"}, {"name": "b", "imported": "b"}],
            "hooks": [{"layer": 3, "site": "resid_pre"}], "tokens": {"tokenset": first.tokenset_id},
            "train": train_section(["a", "b"], **extra)}))

    with pytest.raises(ConfigError, match="sequences of length 1.*set train.include_first_position = true"):
        T.run_train(config(), log=quiet, progress=False)
    cfg = config(include_first_position=True)
    report = T.run_train(cfg, log=quiet, progress=False)
    _, ts, _, _, arrays = T.open_arrays(cfg, cfg.train)
    loader = T.make_loader(arrays, ts, cfg.train, "train", "cpu")
    rows = loader.epoch_rows(0)
    assert rows.max() < 180 and len(rows) == 180 // 32 * 32  # 20 validation rows held out
    expected = torch.stack([a[rows[:32]] * arrays[0].scale, b[rows[:32]] * arrays[1].scale], 1)
    assert torch.equal(next(iter(loader)).float(), expected)
    assert set(report.dictionaries["relu"]) >= {"val/mse", "val/fvu"}
    # both reasons at once: no weights, and no tokens to run the models on
    with pytest.raises(SpliceError, match=r"\['a', 'b'\].*needs the model weights.*splicing is "
                                          "unavailable: the cache holds no tokens"):
        run_eval(cfg, progress=False, log=quiet)


def test_imported_model_with_weights_splices(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=40)
    tok = make_tokenizer(corpus["text"].read_text().split("\n\n"))
    model_dir = make_model(tmp_path / "tiny", tok, "llama", d_model=D, n_layers=2)
    ids = torch.randint(3, len(tok), (N_SEQ, CTX), generator=torch.Generator().manual_seed(24))
    ids[:, 0] = tok.bos_token_id
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        acts = model(ids, output_hidden_states=True).hidden_states[1].reshape(-1, D)  # layer0.resid_post
    src = write_dl_cache(tmp_path / "cache", acts, [N_SEQ * CTX], tokens=ids.flatten(),
                         ranges=torch.arange(0, N_SEQ * CTX + 1, CTX), name="resid_post_layer_0")
    res = _import(src, tmp_path / "store", "tiny")
    assert res.array_path.endswith("layer0.resid_post")
    def config(imported: str | None = None):
        return load_config(write_config(tmp_path / "spliced.toml", {
            "name": "spliced", "store": str(tmp_path / "store"),
            "models": [{"name": "tiny", "path": str(model_dir), "imported": imported}],
            "hooks": [{"layer": 0}], "tokens": {"tokenset": res.tokenset_id}, "train": train_section(["tiny"]),
            "eval": {"n_sequences": 4, "batch_size": 4, "top_latents": 4, "contexts_per_latent": 2}}))

    # weights alone look for activations cached from them, and point at the imported ones
    with pytest.raises(S.IncompleteError, match="add imported = '<name>'.*'tiny'"):
        T.run_train(config(), log=quiet, progress=False)
    cfg = config(imported="tiny")
    T.run_train(cfg, log=quiet, progress=False)
    # an imported array names no weights to compare with: the live activations are checked instead
    other = make_model(tmp_path / "other", tok, "llama", d_model=D, n_layers=2, seed=1)
    wrong = dataclasses.replace(cfg, models=[dataclasses.replace(cfg.models[0], path=str(other))])
    with pytest.raises(SpliceError, match="differ from the stored ones"):
        run_eval(wrong, progress=False, log=quiet)
    lines: list[str] = []
    result = run_eval(cfg, progress=False, log=lambda *a: lines.append(" ".join(map(str, a))))["relu"]
    splice = result["splice"]
    metrics = splice["metrics"]["per_model"]["tiny"]
    # the log gives ΔCE with its standard error, and the stored-row EV of the typical tokens
    typical = result["diff"]["reconstruction_by_source"]["tiny"]["typical"]
    assert any(f"ΔCE {metrics['ce_diff']:.4f} ± {metrics['ce_diff_stderr']:.4f}" in line for line in lines)
    assert any(f"tiny {typical['explained_variance']:.3f} ({typical['tokens']:,} tokens)" in line for line in lines)
    assert metrics["store_rel_error"] < 1e-4  # the imported rows are this model's activations
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("ce_loss_without_sae", "ce_loss_with_sae"))
    assert (tmp_path / "runs" / "spliced" / "eval" / "relu" / "splice.json").is_file()


def _config(tmp_path, tokens: dict, models=None) -> str:
    mapping = {"name": "x", "store": str(tmp_path), "hooks": [{"layer": 1}], "tokens": tokens,
               "models": models or [{"name": "a", "imported": "a"}]}
    with pytest.raises(ConfigError) as e:
        parse_config(mapping, "x.toml")
    return str(e.value)


def test_config_errors_for_imported_caches(tmp_path):
    source = [{"kind": "text", "paths": [__file__]}]
    both = _config(tmp_path, {"tokenset": TS, "sources": source})
    assert "tokens.sources: is set together with tokens.tokenset (keep one" in both
    neither = _config(tmp_path, {})
    assert "tokens.sources: is empty" in neither and "tokens.tokenset = 'ts-...'" in neither
    assert "models[0].imported: needs tokens.tokenset" in neither
    assert "tokens.tokenset: 'ts-12' is not a token set id" in _config(tmp_path, {"tokenset": "ts-12"})
    sized = _config(tmp_path, {"tokenset": TS, "context_length": 128, "seed": 1})
    assert "tokens.context_length: is set together with tokens.tokenset" in sized
    assert "tokens.seed: is set together with tokens.tokenset" in sized
    nowhere = _config(tmp_path, {"tokenset": TS}, [{"name": "a"}])
    assert "models[0]: says nowhere to load weights from" in nowhere and "imported = '<name" in nowhere
    assert "models[0].imported: is empty" in _config(tmp_path, {"tokenset": TS},
                                                     [{"name": "a", "imported": ""}])
    tokenizer = _config(tmp_path, {"tokenset": TS, "tokenizer": "a"})
    assert "tokens.tokenizer: 'a' names a model without weights" in tokenizer
    assert "did you mean 'imported'" in _config(tmp_path, {"tokenset": TS},
                                                 [{"name": "a", "imprted": "a"}])
    cfg = parse_config({"name": "x", "store": str(tmp_path), "hooks": [{"layer": 1}],
                        "tokens": {"tokenset": TS},
                        "models": [{"name": "a", "imported": "a"}, {"name": "b", "imported": "b",
                                                                      "path": str(tmp_path)}]})
    assert [m.has_weights for m in cfg.models] == [False, True] and cfg.tokens.sources == []
    # the README's example is such a config
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.DOTALL) if "imported =" in b)
    cfg = parse_config({"name": "x", "store": str(tmp_path), **tomllib.loads(block)}, "README.md")
    assert (cfg.models[0].imported, cfg.hooks[0].label) == ("base", "layer12.resid_post")


def test_incomplete_import_says_to_rerun_the_import(tmp_path, monkeypatch):
    src = write_dl_cache(tmp_path / "cache", _acts(N_SEQ * CTX, seed=25), [N_SEQ * CTX])
    real = S.ActivationArray.write_shard

    def dies_on_the_second(self, shard, data, writer=""):
        if shard == 1:
            raise KeyboardInterrupt("killed")
        real(self, shard, data, writer)

    monkeypatch.setattr(S.ActivationArray, "write_shard", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _import(src, tmp_path / "store", "m0", hook="layer1.resid_post")
    [path] = S.list_activation_arrays(S.StoreRoot(str(tmp_path / "store")))
    with pytest.raises(S.IncompleteError) as e:
        S.open_activation_array(S.StoreRoot(str(tmp_path / "store")), path, require_complete=True)
    assert "1/5 shards written" in str(e.value)
    command = str(e.value).split("rerunning (it resumes): ")[1]
    assert command.startswith(f"mdiff import-cache {src} --store {tmp_path / 'store'} --model m0 "
                              "--hook layer1.resid_post --format dictionary_learning ")
    # the recorded command is complete: running it finishes the import
    monkeypatch.setattr(S.ActivationArray, "write_shard", real)
    assert cli_main(shlex.split(command)[1:]) == 0
    S.open_activation_array(S.StoreRoot(str(tmp_path / "store")), path, require_complete=True)
    assert "mdiff cache" not in str(e.value)
