"""Importing foreign activation caches into the store.

The caches are written here from their documented layouts: dictionary_learning's ActivationCache
(shard_<i>.memmap + shard_<i>.meta + config.json, tokens.pt and sequence_ranges.pt beside them)
and SAELens' cached activations (a datasets folder, one Array2D column per hook name, token_ids).
The imported arrays are checked row for row against the foreign values times a scale recomputed
here from its definition, read back through the loader, killed and resumed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdiff.cli import main as cli_main
from pipeline import import_cache as IC
from pipeline import store as S
from tests.interop.foreign_caches import CTX, D, write_dl_cache
from tests.interop.foreign_caches import activations as _acts
from trainer.loader import ActivationLoader


def expected_scale(acts: torch.Tensor, n_rows: int, ctx: int, exclude=()) -> float:
    """sqrt(d) / mean ||x|| over the first n_rows, positions 0 (or the given rows) left out."""
    rows = [r for r in range(n_rows) if (ctx < 2 or r % ctx) and r not in set(exclude)]
    mean = float(acts[rows].norm(dim=-1).double().mean())
    return float(torch.tensor(math.sqrt(D) / mean, dtype=torch.float32))


def _import(src, store, **kw):
    kw = {"model": "m0", "chunk_rows": 32, "shard_rows": 64, "validation_fraction": 0.1,
          "storage_dtype": "float32", "scale_sample_tokens": 100, "progress": False,
          "log": lambda *a: None, **kw}
    return IC.import_cache(src, str(store), **kw)


def _stored(store, res) -> torch.Tensor:
    arr = S.open_activation_array(S.StoreRoot(str(store)), res.array_path, require_complete=True)
    return S.read_rows(arr, 0, arr.n_rows).float()


def test_dictionary_learning_cache_with_tokens(tmp_path):
    n_seq = 40
    acts = _acts(n_seq * CTX, seed=0)
    tokens = torch.randint(0, 300, (n_seq * CTX,), generator=torch.Generator().manual_seed(1))
    ranges = torch.arange(0, n_seq * CTX + 1, CTX)
    src = write_dl_cache(tmp_path / "cache", acts, [100, 100, 120], tokens=tokens, ranges=ranges)
    res = _import(src, tmp_path / "store", hook=None)
    assert res.context_length == CTX and res.tokens and res.shards_written == res.n_shards == 5
    root = S.StoreRoot(str(tmp_path / "store"))
    ts = S.open_token_set(root, res.tokenset_id)
    assert np.array_equal(ts.tokens[:], tokens.view(n_seq, CTX).numpy())
    assert (ts.n_train_sequences, ts.attrs["splicing"]) == (36, "available")
    arr = S.open_activation_array(root, res.array_path)
    assert arr.attrs["hook"]["label"] == "layer1.resid_post"  # from the folder name
    assert arr.scale == expected_scale(acts, 104, CTX)  # 100 sample tokens -> 13 whole sequences
    assert torch.equal(_stored(tmp_path / "store", res), acts * arr.scale)
    assert S.verify_array(arr) == []
    loader = ActivationLoader([arr], ts, split="validation", batch_size=16, include_first_position=True,
                              read_threads=1)
    first = next(iter(loader))
    assert torch.equal(first[:, 0].float(), acts[36 * CTX:36 * CTX + 16] * arr.scale)


def test_import_is_resumable_after_a_kill(tmp_path, monkeypatch):
    acts = _acts(40 * CTX, seed=2)
    src = write_dl_cache(tmp_path / "cache", acts, [160, 160], tokens=torch.arange(40 * CTX),
                         ranges=torch.arange(0, 40 * CTX + 1, CTX))
    whole = _import(src, tmp_path / "whole", hook="layer1.resid_post", storage_dtype="bfloat16")

    real, calls = S.ActivationArray.write_shard, []

    def dies_on_the_third(self, shard, data, writer=""):
        calls.append(shard)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real(self, shard, data, writer)

    monkeypatch.setattr(S.ActivationArray, "write_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _import(src, tmp_path / "resumed", hook="layer1.resid_post", storage_dtype="bfloat16")
    monkeypatch.setattr(S.ActivationArray, "write_shard", real)
    with pytest.raises(S.IncompleteError, match="2/5 shards"):
        S.open_activation_array(S.StoreRoot(str(tmp_path / "resumed")), whole.array_path,
                                require_complete=True)
    again = _import(src, tmp_path / "resumed", hook="layer1.resid_post", storage_dtype="bfloat16")
    assert again.shards_written == 3 and again.array_path == whole.array_path
    records = [json.loads((tmp_path / s / whole.array_path / "_complete.json").read_text())["chunk_crc32"]
               for s in ("whole", "resumed")]
    assert records[0] == records[1]
    assert torch.equal(_stored(tmp_path / "whole", whole), _stored(tmp_path / "resumed", again))


def test_cache_without_tokens_or_sequences_bfloat16_shards(tmp_path, capsys):
    acts = _acts(200, seed=3).to(torch.bfloat16).float()  # what the bfloat16 shards hold exactly
    src = write_dl_cache(tmp_path / "cache", acts, [128, 72], dtype="bfloat16", name="layer_3")
    res = _import(src, tmp_path / "store", hook="layer3.resid_pre", storage_dtype="bfloat16")
    assert (res.context_length, res.tokens) == (1, False)
    assert any("no tokens" in n for n in res.notes) and any("length 1" in n for n in res.notes)
    ts = S.open_token_set(S.StoreRoot(str(tmp_path / "store")), res.tokenset_id)
    assert not ts.attrs["tokens_available"] and ts.attrs["splicing"].startswith("unavailable")
    assert (ts.tokens[:] == -1).all()
    assert res.scale == expected_scale(acts, 100, 1)
    assert torch.equal(_stored(tmp_path / "store", res), (acts * res.scale).to(torch.bfloat16).float())
    # the same through the command line, with its progress bar, into another store
    assert cli_main(["import-cache", str(src), "--store", str(tmp_path / "cli"), "--model", "m0",
                     "--hook", "layer3.resid_pre"]) == 0
    assert "tokens ABSENT" in capsys.readouterr().out
    assert cli_main(["status", "--store", str(tmp_path / "cli")]) == 0
    assert "complete" in capsys.readouterr().out


def test_sequences_of_varying_length_keep_their_starts_out_of_the_scale(tmp_path):
    acts = _acts(120, seed=4)
    acts[[0, 50]] *= 100  # attention-sink-like first positions
    ranges = torch.tensor([0, 50, 120])
    src = write_dl_cache(tmp_path / "cache", acts, [120], tokens=torch.arange(120), ranges=ranges)
    res = _import(src, tmp_path / "store", hook="layer1.resid_post", scale_sample_tokens=1000)
    assert res.context_length == 1 and res.tokens
    assert res.scale == expected_scale(acts, 108, 1, exclude=(0, 50))  # 12 validation rows held out


def write_saelens_cache(path, acts: torch.Tensor, token_ids, hooks=("blocks.1.hook_resid_post",)):
    import datasets

    n_seq = acts.shape[0] // CTX
    feats = {h: datasets.Array2D(shape=(CTX, D), dtype="float32") for h in hooks}
    data = {h: acts.view(n_seq, CTX, D).numpy() for h in hooks}
    if token_ids is not None:
        feats["token_ids"] = datasets.Sequence(datasets.Value("int32"), length=CTX)
        data["token_ids"] = token_ids.view(n_seq, CTX).numpy().astype(np.int32)
    datasets.Dataset.from_dict(data, features=datasets.Features(feats)).save_to_disk(str(path))
    return path


def test_saelens_caches_of_two_models_share_a_token_set(tmp_path):
    n_seq = 24
    tokens = torch.randint(0, 300, (n_seq * CTX,), generator=torch.Generator().manual_seed(5))
    a, b = _acts(n_seq * CTX, seed=6), _acts(n_seq * CTX, seed=7) * 3
    results = [_import(write_saelens_cache(tmp_path / name, acts, tokens), tmp_path / "store", model=name)
               for name, acts in (("base", a), ("chat", b))]
    assert results[0].tokenset_id == results[1].tokenset_id and results[0].context_length == CTX
    root = S.StoreRoot(str(tmp_path / "store"))
    ts = S.open_token_set(root, results[0].tokenset_id)
    assert np.array_equal(ts.tokens[:], tokens.view(n_seq, CTX).numpy())
    arrays = [S.open_activation_array(root, r.array_path) for r in results]
    assert [x.attrs["hook"]["label"] for x in arrays] == ["layer1.resid_post"] * 2
    assert arrays[0].scale == expected_scale(a, 104, CTX)  # 100 sample tokens -> 13 whole sequences
    batch = next(iter(ActivationLoader(arrays, ts, split="validation", batch_size=CTX,
                                       include_first_position=True, read_threads=1)))
    rows = slice(22 * CTX, 23 * CTX)
    assert torch.equal(batch.float(), torch.stack([a[rows] * arrays[0].scale, b[rows] * arrays[1].scale], 1))


def test_saelens_cache_with_several_hooks_needs_a_column(tmp_path):
    src = write_saelens_cache(tmp_path / "two", _acts(4 * CTX, 8), None,
                              hooks=("blocks.1.hook_resid_post", "blocks.2.hook_resid_post"))
    with pytest.raises(IC.CacheImportError, match="--column"):
        _import(src, tmp_path / "store")
    res = _import(src, tmp_path / "store", column="blocks.2.hook_resid_post", validation_fraction=0.25)
    assert res.array_path.endswith("layer2.resid_post") and not res.tokens


def test_joining_a_token_set_checks_the_tokens(tmp_path):
    tokens = torch.arange(10 * CTX)
    first = _import(write_saelens_cache(tmp_path / "a", _acts(10 * CTX, 9), tokens), tmp_path / "store")
    other = write_saelens_cache(tmp_path / "b", _acts(10 * CTX, 10), tokens.flip(0))
    with pytest.raises(IC.CacheImportError, match="other tokens"):
        _import(other, tmp_path / "store", model="m1", tokenset=first.tokenset_id)
    blind = write_dl_cache(tmp_path / "dl", _acts(10 * CTX, 11), [10 * CTX], dtype=None, tokens=None,
                           ranges=torch.arange(0, 10 * CTX + 1, CTX))
    res = _import(blind, tmp_path / "store", model="m2", tokenset=first.tokenset_id)
    assert res.tokenset_id == first.tokenset_id and any("row order" in n for n in res.notes)
