"""The cache job end to end, on tiny random-weight models: values, normalization, resume, sharing,
several processes, concurrent jobs, and the errors users hit."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mdiff.cli import main as cli_main
from mdiff.config import load_config
from mdiff.tiny import build_fixture, make_model, make_tokenizer
from mdiff.tiny import write_config as tiny_write_config
from pipeline import cache as C
from pipeline import models as M
from pipeline import store as S
from pipeline.config import HookSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixture")
    return build_fixture(d, archs=("llama", "gpt_neox"), seeds=(0, 1), n_docs=300,
                         d_model=32, n_layers=3)


def write_config(path: Path, fx, models=("llama-s0", "llama-s1"), ctx=16, chunk=64, shard=256,
                 batch=8, **kw) -> Path:
    return tiny_write_config(path, fx, models=models, context_length=ctx, chunk_tokens=chunk,
                             shard_tokens=shard, batch_size=batch, **kw)


def run(cfg_path, **kw):
    return C.run_cache(load_config(cfg_path), log=lambda *a: None, progress=False, **kw)


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every data file of a store (chunks, shards, tokens), by relative path."""
    out = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and "/c/" in f"/{rel}" and ".partial" not in rel:
            out[rel] = f.read_bytes()
    return out


def array_attrs(root: Path) -> dict[str, float]:
    r = S.StoreRoot(str(root))
    return {p: S.open_activation_array(r, p).scale for p in S.list_activation_arrays(r)}


def hidden_state(model_dir, ids, hook: HookSpec):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        hs = model(torch.as_tensor(ids).long(), output_hidden_states=True).hidden_states
    return hs[hook.layer + (hook.site == "resid_post")]


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_stored_values_are_hidden_states_times_scale(tmp_path, fx, arch, storage_dtype):
    cfg = write_config(tmp_path / "exp.toml", fx, models=(f"{arch}-s0",),
                       storage_dtype=storage_dtype)
    report = run(cfg)
    root = S.StoreRoot(str(tmp_path / "store"))
    ts = S.open_token_set(root, report.tokenset_id)
    for label, h in report.models[0].hooks.items():
        hook = HookSpec(int(label.split(".")[0][5:]), label.split(".")[1])
        arr = S.open_activation_array(root, h.path, require_complete=True)
        got = S.read_rows(arr, 0, arr.n_rows).float()
        ref = hidden_state(fx["models"][f"{arch}-s0"], ts.tokens[:], hook)
        ref = (ref.reshape(-1, ref.shape[-1]).float() * arr.scale)
        if storage_dtype == "float32":
            assert torch.equal(got, ref)
        else:
            assert torch.equal(got, ref.to(torch.bfloat16).float())
        # normalized: mean norm sqrt(d_model) on training rows, first positions excluded
        rows = got.reshape(ts.n_sequences, ts.context_length, -1)[: ts.n_train_sequences, 1:]
        mean_norm = rows.norm(dim=-1).mean().item()
        assert abs(mean_norm / math.sqrt(arr.d_model) - 1) < 0.02


def test_second_experiment_reuses_shared_arrays(tmp_path, fx):
    cfg1 = write_config(tmp_path / "a.toml", fx, models=("llama-s0", "llama-s1"))
    run(cfg1)
    before = store_bytes(tmp_path / "store")
    # another experiment names llama-s0 (under another name) plus a new checkpoint
    cfg2 = write_config(tmp_path / "b.toml", fx, models=("llama-s0",), name="other",
                        extra_models=f'[[models]]\nname = "new"\npath = "{fx["models"]["llama-s1"]}"\n'
                                     f'dtype = "bfloat16"\n\n')
    logs = []
    report = C.run_cache(load_config(cfg2), log=logs.append, progress=False)
    assert report.tokenset_reused
    assert all(h.status == "reused" for h in report.models[0].hooks.values())
    assert any("llama-s0: already cached" in line and "nothing to compute" in line for line in logs)
    assert all(h.status == "computed" for h in report.models[1].hooks.values())  # bf16 compute: new key
    after = store_bytes(tmp_path / "store")
    assert {k: after[k] for k in before} == before


def test_incomplete_array_read_names_missing_and_command(tmp_path, fx):
    cfg = write_config(tmp_path / "exp.toml", fx, models=("llama-s0",))
    report = run(cfg)
    root = S.StoreRoot(str(tmp_path / "store"))
    path = next(iter(report.models[0].hooks.values())).path
    root.delete(f"{path}/_complete.json")
    root.delete(f"{path}/_done/00000002.json")
    with pytest.raises(S.IncompleteError) as e:
        S.open_activation_array(root, path, require_complete=True)
    assert "3/4 shards" in str(e.value) and f"mdiff cache {cfg}" in str(e.value)
    # rerunning computes only that shard and restores the identical store
    before = store_bytes(tmp_path / "store")
    report = run(cfg)
    hooks = report.models[0].hooks
    assert hooks[path.rsplit("/", 1)[-1]].shards_written == 1
    assert store_bytes(tmp_path / "store") == before


def test_bad_inputs_fail_before_writing(tmp_path, fx):
    # a tokenizer that differs: same architecture, tokenizer trained on other text
    other_tok = make_tokenizer(["completely different words zebra quartz"] * 50, vocab_size=280)
    other_tok.bos_token_id  # noqa: B018
    odd = make_model(tmp_path / "odd-model", other_tok, "llama", d_model=32, n_layers=3)
    cfg = write_config(tmp_path / "t.toml", fx, models=("llama-s0",), store="s1",
                       extra_models=f'[[models]]\nname = "odd"\npath = "{odd}"\n\n')
    with pytest.raises(M.TokenizerMismatchError) as e:
        run(cfg)
    assert "llama-s0" in str(e.value) and "odd" in str(e.value)
    assert not (tmp_path / "s1" / "tokensets").exists()

    cfg = write_config(tmp_path / "h.toml", fx, models=("llama-s0",), store="s2",
                       hooks=((7, "resid_post"),))
    with pytest.raises(ValueError, match="layer 7"):
        run(cfg)
    assert not (tmp_path / "s2" / "tokensets").exists()


def test_a_chat_model_naming_another_end_token_is_cached_with_a_note(tmp_path, fx):
    """A base model and its chat version (Llama-3.1 and -Instruct) share the vocabulary but name
    different end-of-text tokens: caching both works, and the job says which tokenizer built the ids."""
    import shutil

    from transformers import AutoTokenizer

    chat = shutil.copytree(fx["models"]["llama-s1"], tmp_path / "chat-model")
    chat_tok = AutoTokenizer.from_pretrained(chat)
    chat_tok.eos_token = chat_tok.pad_token  # another token of the same vocabulary ends a turn
    chat_tok.save_pretrained(chat)
    cfg = write_config(tmp_path / "t.toml", fx, models=("llama-s0",), store="s",
                       extra_models=f'[[models]]\nname = "chat"\npath = "{chat}"\n\n')
    logs = []
    report = C.run_cache(load_config(cfg), log=logs.append, progress=False)
    assert [m.name for m in report.models] == ["llama-s0", "chat"]
    assert any("share a vocabulary" in line and "'llama-s0''s" in line for line in logs)


def test_cli_cache_status_verify(tmp_path, fx, capsys):
    cfg = write_config(tmp_path / "exp.toml", fx, models=("llama-s0",))
    assert cli_main(["cache", str(cfg), "--no-progress"]) == 0
    assert cli_main(["status", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "complete (100%)" in out and "token set ts-" in out
    assert cli_main(["verify", str(cfg), "--no-progress"]) == 0
    assert "0 bad chunk(s)" in capsys.readouterr().out
    assert cli_main(["train", str(cfg)]) == 2
    # a bad config: one clear line, exit 2, no traceback
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("batch_size", "batch_sise"))
    assert cli_main(["cache", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "batch_sise" in err and "batch_size" in err and "Traceback" not in err


# -- processes: kill -9 and resume, two ranks, two concurrent jobs --------------------------------
def _env():
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _cache_cmd(cfg):
    return [sys.executable, "-m", "mdiff.cli", "cache", str(cfg), "--no-progress"]


def test_kill_and_resume_is_bit_identical(tmp_path, fx):
    big = dict(n_tokens=4096, shard=256, chunk=64)  # 16 shards per array, 2 models x 2 hooks
    ref_cfg = write_config(tmp_path / "ref" / "exp.toml", fx, **big)
    t0 = time.perf_counter()
    subprocess.run(_cache_cmd(ref_cfg), check=True, env=_env(), capture_output=True)
    duration = time.perf_counter() - t0
    reference = store_bytes(tmp_path / "ref" / "store")
    ref_scales = array_attrs(tmp_path / "ref" / "store")
    assert len(reference) > 20

    rng = random.Random(0)
    total = 4 * 16  # records in a complete store: 2 models x 2 hooks x 16 shards
    partial_states = []
    for attempt in range(2):
        d = tmp_path / f"kill{attempt}"
        cfg = write_config(d / "exp.toml", fx, **big)
        for target in sorted(rng.sample(range(1, total), 2)):
            # kill -9 as soon as `target` shard records exist: the writer thread is then busy
            # with the next shard and the main thread with the next forward
            p = subprocess.Popen(_cache_cmd(cfg), env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 5 * duration
            while p.poll() is None and time.monotonic() < deadline:
                if len(list((d / "store").rglob("_done/*.json"))) >= target:
                    p.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
            p.wait()
            n_done = len(list((d / "store").rglob("_done/*.json")))
            partial_states.append(0 < n_done < total)
        subprocess.run(_cache_cmd(cfg), check=True, env=_env(), capture_output=True)
        assert store_bytes(d / "store") == reference, f"attempt {attempt}"
        assert array_attrs(d / "store") == {k: v for k, v in ref_scales.items()}
        root = S.StoreRoot(str(d / "store"))
        for p in S.list_activation_arrays(root):
            assert S.verify_array(S.open_activation_array(root, p, require_complete=True)) == []
    assert sum(partial_states) >= 3, f"too few kills landed mid-job: {partial_states}"


def test_two_processes_equal_one(tmp_path, fx):
    one = write_config(tmp_path / "one" / "exp.toml", fx, n_tokens=2048)
    subprocess.run(_cache_cmd(one), check=True, env=_env(), capture_output=True)
    two = write_config(tmp_path / "two" / "exp.toml", fx, n_tokens=2048)
    # what the README says to run; --multi_gpu is accelerate's name for "N local processes",
    # which without a GPU run on the CPU with the gloo backend
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           "-m", "mdiff.cli", "cache", str(two), "--no-progress"]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert store_bytes(tmp_path / "two" / "store") == store_bytes(tmp_path / "one" / "store")
    root = S.StoreRoot(str(tmp_path / "two" / "store"))
    writers = set()
    for p in S.list_activation_arrays(root):
        arr = S.open_activation_array(root, p, require_complete=True)
        for s in arr.done_shards():
            writers.add(root.read_json(f"{p}/_done/{s:08d}.json")["writer"].rsplit(":", 1)[-1])
    assert writers == {"rank0", "rank1"}


def test_two_concurrent_jobs_do_not_corrupt(tmp_path, fx):
    ref = write_config(tmp_path / "ref" / "exp.toml", fx, n_tokens=2048)
    subprocess.run(_cache_cmd(ref), check=True, env=_env(), capture_output=True)
    cfg = write_config(tmp_path / "both" / "exp.toml", fx, n_tokens=2048)
    procs = [subprocess.Popen(_cache_cmd(cfg), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    # each job either finished, or stopped with the clear concurrent-creation error; a rerun
    # then completes the store
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 or "re-created by another job" in err, err[-2000:]
    subprocess.run(_cache_cmd(cfg), check=True, env=_env(), capture_output=True)
    assert store_bytes(tmp_path / "both" / "store") == store_bytes(tmp_path / "ref" / "store")
    root = S.StoreRoot(str(tmp_path / "both" / "store"))
    for p in S.list_activation_arrays(root):
        assert S.verify_array(S.open_activation_array(root, p, require_complete=True)) == []


def test_job_on_an_fsspec_store(tmp_path, fx):
    """The same job against a non-local fsspec filesystem (in-memory here; S3 works the same way
    through s3fs), compared with a local run."""
    import uuid

    local = write_config(tmp_path / "local" / "exp.toml", fx, models=("llama-s0",))
    run(local)
    url = f"memory://mdiff-{uuid.uuid4().hex}/store"
    remote = write_config(tmp_path / "remote" / "exp.toml", fx, models=("llama-s0",), store=url)
    report = run(remote)
    root_l, root_r = S.StoreRoot(str(tmp_path / "local" / "store")), S.StoreRoot(url)
    for h in report.models[0].hooks.values():
        a = S.open_activation_array(root_r, h.path, require_complete=True)
        b = S.open_activation_array(root_l, h.path, require_complete=True)
        assert torch.equal(S.read_rows(a, 0, a.n_rows).view(torch.int16),
                           S.read_rows(b, 0, b.n_rows).view(torch.int16))
        assert S.verify_array(a) == []
    assert run(remote).models[0].hooks[next(iter(report.models[0].hooks))].status == "reused"
