"""Latent browser benchmark: how fast the collection pass reads, and how fast the pages open.

One local store of synthetic bfloat16 activations (random rows, random tokens, two "models") and
a random sparse crosscoder (ReLU, biases set so each latent fires on 0.02-1% of tokens):

  (1) the loader alone: the unshuffled validation stream the pass reads, rows/s;
  (1b) the loader with the pass's encode (evals/browser/encode.py: active codes, no dense codes),
      what the pass cannot avoid; beside it the bare fp32 matmul on the same rows (the floor: 2 x
      models x d x latents FLOP a row) and the dense encode the pass used before (encode, then
      nonzero of the dense codes);
  (2) the collection pass (encode + every collector), rows/s, on the same rows; target >= 0.5 x (1),
      which needs an encode faster than the disk (a GPU); on a CPU (2) / (1b) is the collectors' cost;
  (3) the whole build (pass, examples, windows re-encoded, pages written): seconds and bytes on
      disk for `--latents` latents, the largest data file;
  (4) headless Chromium opening index.html and latent.html#<last latent> from file://: the time
      from the page's script start to the first rendered table / latent (the page records it in
      <body data-ready>), and the wall time of the whole chromium run (process start included).

(5) the demo's size: d_model 576 (SmolLM2-135M), 2 models, 512 latents (the demo's crosscoders) and
    4,096: loader, encode, matmul and pass rows/s, where the target is and is not met.

`python -m benchmarks.bench_browser` runs the full size (65,536 latents); `--small` a quick run.
Raw figures go to benchmarks/results/browser.json; with --out the BENCHMARKS.md section too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common.helpers import load_line, machine_info, machine_line, write_section
from pipeline import store as S

HOOK = "layer1.resid_post"


def synthetic_store(path: Path, *, rows: int, d: int, ctx: int = 64, n_models: int = 2, vocab: int = 5000,
                    validation_fraction: float = 0.5, seed: int = 0) -> tuple[S.TokenSet, list[S.ActivationArray]]:
    """A token set of random tokens from two sources (a few repeated sequences) and random arrays."""
    root = S.StoreRoot(str(path))
    root.ensure_format(create=True)
    n_seq = rows // ctx
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(n_seq, ctx), dtype=np.int32)
    tokens[:, 0] = 0  # BOS
    tokens[1::7] = tokens[0]  # a repeated passage: its contexts are shown once
    source = (np.arange(n_seq) % 3 == 0).astype(np.uint8)
    tsid = "ts-browserbench"
    if not S.token_set_complete(root, tsid):
        S.write_token_set(root, tsid, n_seq, ctx, [(tokens, source)],
                          {"n_train_sequences": int(n_seq * (1 - validation_fraction)), "context_length": ctx,
                           "sources": [{"kind": "text", "name": "prose"}, {"kind": "text", "name": "chat"}]})
    arrays = []
    for m in range(n_models):
        arr = S.create_activation_array(
            root, S.activation_path(tsid, f"bench-model{m}", HOOK), n_rows=n_seq * ctx, d_model=d,
            chunk_rows=1024, shard_rows=8192, storage_dtype="bfloat16", compression="none",
            attrs={"scale": 1.0, "tokenset_id": tsid, "context_length": ctx, "hook": {"layer": 1, "site": "resid_post",
                                                                                      "label": HOOK}})
        if not arr.is_complete():
            g = torch.Generator().manual_seed(seed + 1 + m)
            for s in sorted(set(range(arr.n_shards)) - arr.done_shards()):
                lo, hi = arr.shard_rows_range(s)
                x = torch.randn(hi - lo, d, generator=g)
                arr.write_shard(s, S.encode(x, "bfloat16"))
            assert arr.finalize()
        arrays.append(arr)
    return S.open_token_set(root, tsid), arrays


def sparse_crosscoder(n_models: int, d: int, n_latents: int, seed: int = 0):
    """A random ReLU crosscoder whose latents fire on about 0.02-1% of random unit-variance rows,
    with the last model's decoder norms spread so that relative norms cover [0, 1]."""
    from trainer.config import DictionarySpec
    from trainer.dictionaries import build_dictionary

    dic = build_dictionary(DictionarySpec("bench", "relu", n_latents=n_latents, seed=seed), n_models, d).eval()
    with torch.no_grad():
        sigma = dic.W_enc.norm(dim=(0, 1))  # per latent: std of its pre-activation on N(0, 1) rows
        z = torch.empty(n_latents).uniform_(2.3, 3.5, generator=torch.Generator().manual_seed(seed))
        dic.b_enc.copy_(-sigma * z)
        g = torch.Generator().manual_seed(seed + 1)
        dic.W_dec[:, -1].mul_(torch.exp(2.5 * torch.randn(n_latents, 1, generator=g)))
    return dic


def synthetic_browser(out: Path, *, n_latents: int, d: int, rows: int, spec=None, work: Path | None = None,
                      progress: bool = False) -> dict:
    """Build the browser of a random crosscoder on a synthetic store (no model, no tokenizer)."""
    from evals.browser.build import render
    from evals.browser.collect import ScanInputs
    from evals.browser.modeldiff import diff_stats
    from evals.browser.spec import BrowserSpec
    from evals.by_source import source_names

    spec = spec or BrowserSpec(logit_effects=False)
    ts, arrays = synthetic_store(work or out.parent / "store", rows=rows, d=d)
    dic = sparse_crosscoder(len(arrays), d, n_latents)
    inp = ScanInputs(dic, arrays, ts, ["joint"], [list(range(len(arrays)))], False, source_names(ts.attrs))
    diff = diff_stats(dic.W_dec, ["base", "chat"], None, None)
    info = {"title": "Latents of bench", "dictionary": "bench", "kind": "2-model crosscoder", "hook": HOOK,
            "tokenset_id": ts.id, "scales": [1.0, 1.0], "logit_note": "not computed (synthetic)"}
    return render(inp, out, spec=spec, diff=diff, vocab=None, logits=[], logit_models=[], info=info,
                  progress=progress)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def open_page(url: str, *, budget_ms: int = 10000, screenshot: Path | None = None,
              size: str = "1280,900") -> tuple[str, list[str], float]:
    """(DOM after scripts ran, console lines, wall seconds) of `url` in headless Chromium."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as profile:
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
                "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", f"--window-size={size}"]
        args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        t = time.perf_counter()
        run = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
        wall = time.perf_counter() - t
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    return run.stdout, console, wall


def ready_ms(dom: str, attr: str = "data-ready") -> float | None:
    m = re.search(attr + r'="([0-9.]+)"', dom)
    return float(m.group(1)) if m else None


def loader_rate(ts, arrays, rows: int, batch: int, dictionary=None, how: str = "sparse") -> float:
    """Rows/s of the unshuffled validation stream; with `dictionary` each batch is also encoded:
    "sparse" the pass's encode, "dense" dictionary.encode then the nonzero codes (the pass before),
    "matmul" the bare pre-activation matmul (the floor of any fp32 encode)."""
    from evals.browser.collect import active_codes
    from evals.browser.encode import sparse_encode
    from trainer.loader import ActivationLoader

    with ActivationLoader(arrays, ts, split="validation", batch_size=batch, shuffle=False, read_threads=2) as lo:
        t, n = time.perf_counter(), 0
        for x in lo:
            if dictionary is not None:
                with torch.no_grad():
                    if how == "sparse":
                        sparse_encode(dictionary, x.float())
                    elif how == "dense":
                        active_codes(dictionary.encode(x.float()))
                    else:
                        dictionary.pre_activations(x.float())
            n += x.shape[0]
            if n >= rows:
                break
        return n / (time.perf_counter() - t)


def pass_case(work: Path, *, d: int, latents: int, rows: int, n_models: int = 2) -> dict:
    """Loader, encode, matmul floor and collection-pass rows/s of one size (no pages written)."""
    from evals.browser.collect import ScanInputs, collect, default_batch_rows
    from evals.browser.spec import BrowserSpec
    from evals.by_source import source_names

    ts, arrays = synthetic_store(work, rows=rows, d=d, n_models=n_models)
    val_rows = (ts.n_sequences - ts.n_train_sequences) * (ts.context_length - 1)
    batch = default_batch_rows(latents)
    dic = sparse_crosscoder(n_models, d, latents)
    loader_rate(ts, arrays, val_rows, batch)  # warm the page cache: every rate reads from memory
    res = {"d_model": d, "n_models": n_models, "latents": latents, "validation_rows": val_rows, "batch_rows": batch,
           "flop_per_row": 2 * n_models * d * latents, "loader_rows_per_s": loader_rate(ts, arrays, val_rows, batch),
           "matmul_rows_per_s": loader_rate(ts, arrays, val_rows, batch, dic, "matmul"),
           "encode_rows_per_s": loader_rate(ts, arrays, val_rows, batch, dic)}
    # the dense encode on at most 16k rows (it is the slow one)
    res["dense_encode_rows_per_s"] = loader_rate(ts, arrays, min(val_rows, 16384), batch, dic, "dense")
    inp = ScanInputs(dic, arrays, ts, ["joint"], [list(range(n_models))], False, source_names(ts.attrs))
    t = time.perf_counter()
    coll = collect(inp, BrowserSpec(logit_effects=False), progress=False)
    res["pass_rows_per_s"] = coll.n_rows / (time.perf_counter() - t)
    res["mean_l0"] = float(coll.firing[0]["fired"].sum() / max(coll.n_rows, 1))
    res["pass_over_loader"] = res["pass_rows_per_s"] / res["loader_rows_per_s"]
    res["pass_over_encode"] = res["pass_rows_per_s"] / res["encode_rows_per_s"]
    res["matmul_gflop_per_s"] = res["matmul_rows_per_s"] * res["flop_per_row"] / 1e9
    res["target_met"] = res["pass_over_loader"] >= 0.5
    return res


def case_line(c: dict) -> str:
    met = "met" if c["target_met"] else "not met"
    return (f"| {c['latents']:,} | {c['d_model']} x {c['n_models']} | {c['flop_per_row'] / 1e6:,.1f} | "
            f"{c['loader_rows_per_s']:,.0f} | {0.5 * c['loader_rows_per_s'] * c['flop_per_row'] / 1e9:,.0f} | "
            f"{c['matmul_rows_per_s']:,.0f} ({c['matmul_gflop_per_s']:.0f} GFLOP/s) | "
            f"{c['dense_encode_rows_per_s']:,.0f} | {c['encode_rows_per_s']:,.0f} | {c['pass_rows_per_s']:,.0f} | "
            f"{c['pass_over_encode']:.2f} | {c['pass_over_loader']:.3f} ({met}) |")


def section(res: dict, latents: int, d: int, val_rows: int) -> str:
    """The BENCHMARKS.md text: every case's rates, and plainly where the target is met."""
    main_case = {**res, "n_models": 2, "d_model": d, "latents": latents,
                 "matmul_gflop_per_s": res["matmul_rows_per_s"] * res["flop_per_row"] / 1e9,
                 "target_met": res["pass_over_loader"] >= 0.5}
    cases = [main_case, *res["demo_cases"]]
    met = [c for c in cases if c["target_met"]]
    rows = "\n".join(case_line(c) for c in cases)
    verdict = ("met for " + ", ".join(f"{c['latents']:,} latents" for c in met) if met else "met for no case")
    return (f"## The latent browser: collection pass and pages (`benchmarks/bench_browser.py`)\n\n"
            f"Browser collection pass (target: pass rows/s >= 0.5 x the loader's rows/s on the same store): "
            f"**{verdict}** on this CPU. The pass is encode-bound: every row costs a [models x d] x "
            f"[models x d, latents] fp32 matmul (the MFLOP column); reaching half the loader's rate would take the "
            f"'needed' GFLOP/s, several times what this CPU's matmul reaches even at 512 latents, and 100x more "
            f"at 65,536. The encode itself now runs at about the bare matmul's rate: it makes the "
            f"pre-activations a cache-sized block of latents at a time and keeps only the active codes "
            f"(evals/browser/encode.py) instead of dense codes, relu and nonzero (the 'dense encode' column, the "
            f"pass's encode before). The collectors cost the rest (pass / encode; at 65,536 latents a short scan "
            f"is mostly the top-k heaps filling up). bf16 matmuls would about halve the matmul but move codes "
            f"by ~0.4% and flip latents at their thresholds, so the pass stays in fp32. On a GPU the matmul is "
            f"not the bound and the target is the loader's to meet.\n\n"
            f"| latents | d x models | MFLOP/row | loader rows/s | GFLOP/s needed | fp32 matmul rows/s | "
            f"dense encode rows/s | encode rows/s | pass rows/s | pass / encode | pass / loader |\n"
            f"|---|---|---|---|---|---|---|---|---|---|---|\n{rows}\n\n"
            f"Whole build at {latents:,} latents, d_model {d}, {val_rows:,} validation rows: "
            f"{res['build_seconds']:.1f} s (pass {res['pass_seconds']:.1f} s; the rest is drawing the "
            f"{res['examples']:,} examples, re-encoding their windows and writing the pages), "
            f"{res['bytes'] / 1e6:.1f} MB; "
            f"index ready {res.get('index_ready_ms')} ms. The demo-size cases are stores of "
            f"{res['demo_cases'][0]['validation_rows'] if res['demo_cases'] else 0:,} validation rows "
            f"(enough for steady rates; the demo itself scans its 73,728 validation rows).\n\n{load_line(*res['load_average'])}\n\n{machine_line(res['machine'])}\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--rows", type=int, default=131072, help="stored rows (half are the validation split)")
    ap.add_argument("--small", action="store_true", help="a quick run: 4096 latents, 32768 rows")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default="benchmarks/results/browser.json")
    ap.add_argument("--out", default=None, help="also rewrite this file's browser section (e.g. BENCHMARKS.md)")
    ap.add_argument("--demo-latents", default="512,4096", help="latents of the demo-size cases (d_model 576)")
    ap.add_argument("--demo-rows", type=int, default=65536, help="stored rows of the demo-size store (half validation)")
    args = ap.parse_args(argv)
    if args.small:
        args.latents, args.rows = 4096, 32768
    from evals.browser.collect import default_batch_rows
    from evals.browser.spec import BrowserSpec

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-browser-"))
    ts, arrays = synthetic_store(work / "store", rows=args.rows, d=args.d)
    spec = BrowserSpec(logit_effects=False)
    val_rows = (ts.n_sequences - ts.n_train_sequences) * (ts.context_length - 1)
    batch = default_batch_rows(args.latents)
    res: dict = {"latents": args.latents, "d_model": args.d, "validation_rows": val_rows, "batch_rows": batch}
    load_before = os.getloadavg()
    loader_rate(ts, arrays, val_rows, batch)  # warm the page cache: both passes read from memory
    res["loader_rows_per_s"] = loader_rate(ts, arrays, val_rows, batch)
    dic = sparse_crosscoder(len(arrays), args.d, args.latents)
    res["flop_per_row"] = 2 * len(arrays) * args.d * args.latents
    res["matmul_rows_per_s"] = loader_rate(ts, arrays, val_rows, batch, dic, "matmul")
    res["encode_rows_per_s"] = loader_rate(ts, arrays, val_rows, batch, dic)
    res["dense_encode_rows_per_s"] = loader_rate(ts, arrays, min(val_rows, 16384), batch, dic, "dense")
    t = time.perf_counter()
    built = synthetic_browser(work / "browser", n_latents=args.latents, d=args.d, rows=args.rows,
                              work=work / "store", spec=spec)
    res["build_seconds"] = time.perf_counter() - t
    res["pass_rows_per_s"] = built["rows"] / built["pass_seconds"]
    res["pass_over_loader"] = res["pass_rows_per_s"] / res["loader_rows_per_s"]
    res["pass_over_encode"] = res["pass_rows_per_s"] / res["encode_rows_per_s"]
    res.update({k: built[k] for k in ("pass_seconds", "seconds", "bytes", "files", "block_bytes_max", "examples")})
    res["mean_l0"] = built["mean_l0"]
    res["index_js_bytes"] = (work / "browser" / "data" / "index.js").stat().st_size
    if chromium():
        for page, url in (("index", "index.html"), ("latent", f"latent.html#{args.latents - 1}")):
            times = []
            for _ in range(3):
                dom, console, wall = open_page(f"file://{work / 'browser' / url}")
                times.append((ready_ms(dom), wall, console))
            res[f"{page}_ready_ms"] = [x[0] for x in times]
            res[f"{page}_chromium_wall_s"] = [round(x[1], 2) for x in times]
            res[f"{page}_console"] = sorted({c for x in times for c in x[2]})
    res["demo_cases"] = [pass_case(work / f"store-{576}", d=576, latents=int(n), rows=args.demo_rows)
                         for n in args.demo_latents.split(",") if n]
    res["load_average"] = [load_before, os.getloadavg()]
    res["machine"] = machine_info()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    if args.out:
        write_section(Path(args.out), "browser", section(res, args.latents, args.d, val_rows))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
