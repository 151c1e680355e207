"""Latent browser benchmark: how fast the collection pass reads, and how fast the pages open.

One local store of synthetic bfloat16 activations (random rows, random tokens, two "models") and
a random sparse crosscoder (ReLU, biases set so each latent fires on 0.02-1% of tokens):

  (1) the loader alone: the unshuffled validation stream the pass reads, rows/s;
  (1b) the loader with the encode (and the active codes picked out): what the pass cannot avoid;
  (2) the collection pass (encode + every collector), rows/s, on the same rows; target >= 0.5 x (1),
      which needs an encode faster than the disk (a GPU); on a CPU (2) / (1b) is the collectors' cost;
  (3) the whole build (pass, examples, windows re-encoded, pages written): seconds and bytes on
      disk for `--latents` latents, the largest data file;
  (4) headless Chromium opening index.html and latent.html#<last latent> from file://: the time
      from the page's script start to the first rendered table / latent (the page records it in
      <body data-ready>), and the wall time of the whole chromium run (process start included).

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

from benchmarks.common.helpers import machine_info, machine_line, write_section
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
    from evals.browser.build import render, source_names
    from evals.browser.collect import ScanInputs
    from evals.browser.modeldiff import diff_stats
    from evals.browser.spec import BrowserSpec

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


def loader_rate(ts, arrays, rows: int, batch: int, dictionary=None) -> float:
    """Rows/s of the unshuffled validation stream (with `dictionary`: each batch also encoded)."""
    from evals.browser.collect import active_codes
    from trainer.loader import ActivationLoader

    with ActivationLoader(arrays, ts, split="validation", batch_size=batch, shuffle=False, read_threads=2) as lo:
        t, n = time.perf_counter(), 0
        for x in lo:
            if dictionary is not None:
                with torch.no_grad():
                    active_codes(dictionary.encode(x.float()))
            n += x.shape[0]
            if n >= rows:
                break
        return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latents", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--rows", type=int, default=131072, help="stored rows (half are the validation split)")
    ap.add_argument("--small", action="store_true", help="a quick run: 4096 latents, 32768 rows")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--json", default="benchmarks/results/browser.json")
    ap.add_argument("--out", default=None, help="also rewrite this file's browser section (e.g. BENCHMARKS.md)")
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
    loader_rate(ts, arrays, val_rows, batch)  # warm the page cache: both passes read from memory
    res["loader_rows_per_s"] = loader_rate(ts, arrays, val_rows, batch)
    dic = sparse_crosscoder(len(arrays), args.d, args.latents)
    res["encode_rows_per_s"] = loader_rate(ts, arrays, val_rows, batch, dic)
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
    res["machine"] = machine_info()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
    if args.out:
        body = (f"Browser: {args.latents:,} latents, d_model {args.d}, {val_rows:,} validation rows. Loader "
                f"{res['loader_rows_per_s']:,.0f} rows/s, pass {res['pass_rows_per_s']:,.0f} rows/s "
                f"({res['pass_over_loader']:.2f}x; encode alone {res['encode_rows_per_s']:,.0f} rows/s); build {res['build_seconds']:.1f} s, {res['bytes'] / 1e6:.1f} MB; "
                f"index ready {res.get('index_ready_ms')} ms.\n\n{machine_line(res['machine'])}\n")
        write_section(Path(args.out), "browser", body)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
