"""`mdiff`: one command, a subcommand per stage. The Makefile targets call it.

Errors a user can fix (bad config, missing checkpoint, incomplete store, ...) print one clear
message and exit 2; a traceback means a bug in mdiff.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from pipeline import models, store, tokens
    from pipeline.typed_config import ConfigError
    from trainer.checkpoint import CheckpointError
    from trainer.formats.common import FormatError
    from trainer.trained import TrainedDictionaryError

    return (ConfigError, store.StoreError, models.ModelLoadError,
            models.UnsupportedModelError, models.TokenizerMismatchError,
            tokens.TokenSourceError, FileNotFoundError, FormatError, TrainedDictionaryError, CheckpointError)


def _root_from_args(args):
    from mdiff.config import load_config
    from pipeline.store import StoreRoot

    if args.store:
        return StoreRoot(args.store), None
    if not args.config:
        raise SystemExit("error: give an experiment config or --store URL")
    cfg = load_config(args.config)
    return StoreRoot(cfg.store, cfg.storage_options), cfg


def cmd_cache(args) -> int:
    from mdiff.config import load_config
    from pipeline import experiment as E
    from pipeline.cache import run_cache

    cfg = load_config(args.config)
    E.require_sources(cfg, "mdiff cache")
    if getattr(args, "repair", False) and _repair(cfg, args):
        return 1
    report = run_cache(cfg, progress=not args.no_progress)
    print(f"token set {report.tokenset_id} ({'reused' if report.tokenset_reused else 'built'})")
    for m in report.models:
        for label, h in m.hooks.items():
            print(f"  {m.name:<20} {label:<22} {h.status:<9} shards written {h.shards_written:>5}  "
                  f"scale {h.scale:.6g}  {h.path}")
    return 0


def _repair(cfg, args) -> int:
    """Repair bad chunks of recorded shards; returns how many could not be repaired."""
    from pipeline.repair import repair_store

    report = repair_store(cfg, progress=not args.no_progress)
    for r in report.repaired:
        print(f"rewrote {r.path} shard {r.shard}: chunk(s) {', '.join(map(str, r.chunks))}")
    for b in report.unrepairable:
        print(f"NOT REPAIRED {b.path} chunk {b.chunk} rows {b.rows[0]}-{b.rows[1]}: {b.reason}")
    print(f"repair: checked {report.arrays_checked} array(s), rewrote {len(report.repaired)} "
          f"shard(s), {len(report.unrepairable)} chunk(s) not repaired")
    return len(report.unrepairable)


def cmd_train(args) -> int:
    from mdiff.config import load_config
    from trainer.distributed import DistributedError
    from trainer.train import run_train

    cfg = load_config(args.config)
    try:  # launched on several processes, one of which stopped: a clear message, no traceback
        report = run_train(cfg, resume=args.resume, progress=not args.no_progress)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    print(f"dictionaries and metrics.jsonl in {report.out_dir}")
    return 0


def cmd_eval(args) -> int:
    from evals.run import run_eval
    from mdiff.config import load_config

    run_eval(load_config(args.config), progress=not args.no_progress, dict_dirs=args.dictionary)
    return 0


def cmd_browse(args) -> int:
    from mdiff.browse import browse, export_latent
    from mdiff.config import load_config

    cfg = load_config(args.config)
    if args.export_latent is not None:
        path = export_latent(cfg, args.name, args.export_latent, dict_dirs=args.dictionary, out=args.out)
        print(f"latent {args.export_latent}: {path}")
        return 0
    options = {k: v for k, v in (("rows", args.rows), ("top_k", args.top_k), ("bands", args.bands)) if v is not None}
    options.update(logit_effects=not args.no_logits, neuronpedia=args.neuronpedia)
    browse(cfg, options=options, dict_dirs=args.dictionary, out=args.out, progress=not args.no_progress)
    return 0


def _floats(text: str | None) -> list[float] | None:
    try:
        return None if text is None else [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {text!r}: give comma-separated numbers, e.g. 0.5,0.25") from None


def cmd_import_dictionary(args) -> int:
    from mdiff.config import load_config
    from trainer.formats.attach import import_dictionary

    out = import_dictionary(args.source, load_config(args.config), format=args.format,
                            models=args.models.split(",") if args.models else None, hook=args.hook,
                            name=args.name, out_dir=args.out, input_scales=_floats(args.input_scales))
    print(f"evaluate it with: mdiff eval {args.config} --dictionary {out}")
    return 0


def cmd_export_saelens(args) -> int:
    from trainer.formats.attach import export_saelens

    print(f"SAELens SAE (raw activations) in {export_saelens(args.dictionary, args.out)}")
    return 0


def cmd_import_cache(args) -> int:
    from pipeline import store as S
    from pipeline.import_cache import import_cache

    cache, store, options = None, args.store, None
    if args.config:
        from mdiff.config import load_config

        cfg = load_config(args.config)
        cache, store, options = cfg.cache, store or cfg.store, cfg.storage_options
    if not store:
        raise SystemExit("error: give an experiment config (its store and [cache] settings) or --store URL")
    res = import_cache(
        args.source, store, model=args.model, hook=args.hook, format=args.format, column=args.column,
        validation_fraction=args.validation_fraction, tokenset=args.tokenset,
        storage_dtype=args.storage_dtype or (cache.storage_dtype if cache else "bfloat16"),
        chunk_rows=args.chunk_rows or (cache.chunk_tokens if cache else 4096),
        shard_rows=args.shard_rows or (cache.shard_tokens if cache else 65536),
        scale_sample_tokens=cache.scale_sample_tokens if cache else 262_144,
        storage_options=options, progress=not args.no_progress)
    print(f"token set {res.tokenset_id} (sequences of {res.context_length}; tokens "
          f"{'imported' if res.tokens else 'ABSENT'})\n  {res.array_path}: scale {res.scale:.6g}, "
          f"{res.shards_written} of {res.n_shards} shards written this run")
    for note in res.notes:
        print(f"  note: {note}")
    model = S.open_activation_array(S.StoreRoot(store, options), res.array_path).attrs["model_name"]
    print(f"{IMPORTED_CONFIG_HEADER}\n{imported_config(res, model)}")
    return 0


IMPORTED_CONFIG_HEADER = ("to train on it, put these lines in an experiment config "
                          "(beside name, store and [train]):")


def imported_config(res, model: str) -> str:
    """The config lines naming an imported array: its token set, hook and import name.

    Printed for a user to paste, with comments on what to add; a TOML writer cannot write
    comments, so this stays text (tests/interop/test_imported_training.py reads it as TOML)."""
    from pipeline import hook_names

    hook = hook_names.parse_label(res.array_path.rsplit("/", 1)[1])
    weights = ("# path = \"...\"  # its weights (or repo / gguf): mdiff eval needs them to splice"
               if res.tokens else "# no tokens were imported: mdiff eval cannot splice this model")
    lines = ["[[models]]", f"name = {json.dumps(re.sub(r'[^A-Za-z0-9_.-]+', '-', model))}",
             f"imported = {json.dumps(model)}", weights, "", "[[hooks]]", f"layer = {hook.layer}",
             f"site = {json.dumps(hook.site)}", "", "[tokens]", f"tokenset = {json.dumps(res.tokenset_id)}"]
    if res.context_length < 2:
        lines.append("# rows without sequences: also set include_first_position = true in [train]")
    return "\n".join(lines)


def cmd_report(args) -> int:
    from evals.report import write_report
    from evals.report_rows import aggregate, collect
    from evals.report_tables import format_table
    from evals.run import eval_dir
    from mdiff.config import load_config

    cfgs = [load_config(c) for c in args.configs]
    dirs = [eval_dir(c) for c in cfgs if c.train is not None]
    if not dirs:
        raise SystemExit("error: none of these configs has a [train] section, so nothing was evaluated")
    out = Path(args.out) if args.out else dirs[0].parent / "report"
    paths = write_report(dirs, out)
    print(format_table(aggregate(collect(dirs))))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_status(args) -> int:
    from pipeline import store as S

    root, _ = _root_from_args(args)
    root.ensure_format(create=False)
    token_sets = S.list_token_sets(root)
    arrays = S.list_activation_arrays(root)
    if not token_sets and not arrays:
        print(f"{root.url}: empty store")
        return 0
    print(f"store {root.url}")
    for ts in token_sets:
        ok = S.token_set_complete(root, ts)
        print(f"  token set {ts}: {'complete' if ok else 'INCOMPLETE'}")
    for path in arrays:
        arr = S.open_activation_array(root, path)
        done, total = arr.progress()
        state = "complete" if arr.is_complete() else f"INCOMPLETE {done}/{total} shards"
        print(f"  {path}: [{arr.n_rows:,} x {arr.array.shape[1]}] {arr.storage_dtype} "
              f"scale {arr.scale:.6g}: {state} ({100 * done / total:.0f}%)")
    return 0


def cmd_verify(args) -> int:
    from tqdm.auto import tqdm

    from pipeline import store as S

    root, _ = _root_from_args(args)
    root.ensure_format(create=False)
    paths = S.list_activation_arrays(root)
    n_bad = 0
    for path in paths:
        arr = S.open_activation_array(root, path)
        with tqdm(total=arr.n_rows, unit="row", unit_scale=True, desc=path.rsplit("/", 2)[-2],
                  disable=args.no_progress) as bar:
            bad = S.verify_array(arr, progress=bar)
        done, total = arr.progress()
        for b in bad:
            print(f"BAD {b.path} chunk {b.chunk} rows {b.rows[0]}-{b.rows[1]}: {b.reason}")
        n_bad += len(bad)
        note = "" if done == total else f" (incomplete: {done}/{total} shards recorded)"
        print(f"{'ok ' if not bad else 'BAD'} {path}{note}")
    print(f"verified {len(paths)} array(s): {n_bad} bad chunk(s)")
    return 1 if n_bad else 0


def cmd_smoke(args) -> int:
    """The whole pipeline on a tiny offline experiment (random-weight models, generated text)."""
    from mdiff.tiny import build_fixture, write_smoke_config

    directory = Path(args.directory)
    fx = build_fixture(directory, archs=("llama",), seeds=(0, 1), n_docs=2500)
    config_path = write_smoke_config(directory, fx)
    print(f"wrote {config_path}")
    args.config = str(config_path)
    args.resume, args.dictionary = False, None
    args.configs, args.out = [args.config], None
    return cmd_cache(args) or cmd_train(args) or cmd_eval(args) or cmd_report(args)


def cmd_demo(args) -> int:
    """The whole pipeline on real models (SmolLM2 and a Bible fine-tune of it), offline, on a CPU."""
    from mdiff.corpora import CorpusError
    from mdiff.demo import run_demo
    from mdiff.prepare import PrepareError

    try:
        run_demo(args.directory, kjv=args.kjv, other=args.other, progress=not args.no_progress)
    except (CorpusError, PrepareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_toy(args) -> int:
    """Ground truth for dictionaries: synthetic features with a known true L0 (mdiff/toy_study.py)."""
    from mdiff.toy_study import main as toy_main

    return toy_main([args.directory, *(["--config", args.config] if args.config else []),
                     *(["--no-progress"] if args.no_progress else [])])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdiff", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cache", help="tokenize and cache normalized activations (resumable)")
    c.add_argument("config", help="experiment config (.toml or .yaml)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--repair", action="store_true",
                   help="first verify every recorded chunk and recompute the bad ones")
    c.set_defaults(func=cmd_cache)

    t = sub.add_parser("train", help="train the [train] section's SAEs / crosscoders in lockstep")
    t.add_argument("config", help="experiment config with a [train] section")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="splice each dictionary into its models; model-diff analyses")
    e.add_argument("config", help="experiment config with [train] (and optionally [eval])")
    e.add_argument("--dictionary", action="append", metavar="DIR",
                   help="evaluate this dictionary folder (e.g. an imported one) instead of [train]'s; "
                   "repeatable")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("browse", help="the latent browser: every latent's examples, statistics and model diff "
                       "as pages that open from disk")
    b.add_argument("config", help="experiment config with [train] (and optionally [eval])")
    b.add_argument("--dictionary", action="append", metavar="DIR",
                   help="this dictionary folder instead of [train]'s; repeatable")
    b.add_argument("--out", help="evaluation folder (default: the one mdiff eval writes to)")
    b.add_argument("--rows", type=int, help="validation tokens scanned at most (default 1000000)")
    b.add_argument("--top-k", type=int, help="top activations per latent (default 12)")
    b.add_argument("--bands", type=int, help="activation bands sampled below the top (default 5)")
    b.add_argument("--no-logits", action="store_true", help="no logit effects (reads no model weights)")
    b.add_argument("--neuronpedia", action="store_true", help="also write Neuronpedia (SAEDashboard) batch files")
    b.add_argument("--export-latent", type=int, metavar="ID",
                   help="do not build: write latent ID of a built browser as JSON")
    b.add_argument("--name", help="with --export-latent: which dictionary (default: the only one)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_browse)

    i = sub.add_parser("import-dictionary", help="a SAELens / dictionary_learning / crosscoder "
                       "dictionary, re-expressed for the experiment's stored arrays")
    i.add_argument("config", help="experiment config whose store holds the models' activations")
    i.add_argument("source", help="the foreign dictionary's folder (or .pt file)")
    i.add_argument("--format", default="auto", help="auto | saelens | dictionary_learning | gemma_crosscoder")
    i.add_argument("--models", help="comma-separated config model names, in the dictionary's model order")
    i.add_argument("--hook", help="config hook label (default: the one the dictionary's config names)")
    i.add_argument("--input-scales", help="comma-separated factors the dictionary's inputs were "
                   "multiplied by in training (default 1: raw activations)")
    i.add_argument("--name", help="name of the imported dictionary (default: the source folder's)")
    i.add_argument("--out", help="output folder (default: <train.out_dir>/<name>)")
    i.set_defaults(func=cmd_import_dictionary)

    x = sub.add_parser("export-saelens", help="write an SAE as a SAELens folder (raw activations)")
    x.add_argument("dictionary", help="a dictionary folder written by mdiff train or import-dictionary")
    x.add_argument("out", help="output folder (cfg.json + sae_weights.safetensors)")
    x.set_defaults(func=cmd_export_saelens)

    c = sub.add_parser("import-cache", help="a dictionary_learning or SAELens activation cache into "
                       "the store (resumable)")
    c.add_argument("source", help="the foreign cache folder")
    c.add_argument("config", nargs="?", help="experiment config (its store and [cache] settings)")
    c.add_argument("--store", help="store root (path or fsspec URL) instead of a config's")
    c.add_argument("--model", help="name for the model (default: what the cache records)")
    c.add_argument("--hook", help="layer<L>.resid_pre|resid_post (default: from the cache's hook name)")
    c.add_argument("--format", default="auto", help="auto | dictionary_learning | saelens")
    c.add_argument("--column", help="SAELens caches: the hook-name column to import")
    c.add_argument("--validation-fraction", type=float, default=0.05,
                   help="the last sequences held out as the validation split")
    c.add_argument("--tokenset", help="join this existing token set (another model's cache of the same rows)")
    c.add_argument("--storage-dtype", choices=("bfloat16", "float32"))
    c.add_argument("--chunk-rows", type=int, help="rows per chunk (default: the config's [cache] "
                   "chunk_tokens, else 4096)")
    c.add_argument("--shard-rows", type=int, help="rows per shard (default: the config's [cache] "
                   "shard_tokens, else 65536)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_import_cache)

    r = sub.add_parser("report", help="mean ± std tables over seeds (CSV, Markdown, LaTeX)")
    r.add_argument("configs", nargs="+", help="one or more evaluated experiment configs")
    r.add_argument("--out", help="output folder (default: <first experiment's runs>/report)")
    r.set_defaults(func=cmd_report)

    for name, func, helptext in [("status", cmd_status, "list stores and how complete they are"),
                                 ("verify", cmd_verify, "decode every chunk and check its checksum")]:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("config", nargs="?", help="experiment config (its store is used)")
        s.add_argument("--store", help="store root (path or fsspec URL) instead of a config")
        s.add_argument("--no-progress", action="store_true")
        s.set_defaults(func=func)

    s = sub.add_parser("smoke", help="offline smoke run: tiny random models, generated text")
    s.add_argument("directory", nargs="?", default="runs/smoke")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_smoke)

    s = sub.add_parser("demo", help="real models offline: SmolLM2 vs a Bible fine-tune of it, with a checked finding")
    s.add_argument("directory", nargs="?", default="runs/demo")
    s.add_argument("--kjv", help="the King James Bible as `bible` prints it, instead of Debian's bible-kjv")
    s.add_argument("--other", help="a plain-text file (blank lines between paragraphs) instead of Austen: its first "
                   "half anchors the fine-tune, its second half is analysed")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("toy", help="ground truth: known features and true L0, a k sweep, the L0 estimate")
    s.add_argument("directory", nargs="?", default="runs/toy")
    s.add_argument("--config", help="study spec (TOML); default: the reference toy setting")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_toy)

    from mdiff import saebench as saebench_app
    saebench_app.add_parser(sub)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
