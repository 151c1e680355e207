"""`mdiff browse`: the latent browser of an experiment's dictionaries, and exports from it.

Each dictionary's browser goes to `<eval dir>/<dictionary>/browser/` (beside its evaluation, whose
latent_scaling.csv it shows when present); `index.html` there opens from disk in any browser.
Options come from the command line as a `BrowserSpec` mapping, checked like a config section.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from evals.browser import BROWSER_DIR, browser_spec, build_browser, latent_json
from evals.config import EvalExperiment, EvalSpec
from pipeline.typed_config import ConfigError


def dictionary_dirs(cfg: EvalExperiment, dict_dirs=None) -> tuple[dict[str, Path], Path]:
    """({name: dictionary folder}, evaluation folder), as `mdiff eval` chooses them."""
    from evals.run import eval_dir

    ev = cfg.eval or EvalSpec()
    if dict_dirs:
        dirs = {Path(d).name: Path(d) for d in dict_dirs}
        return dirs, eval_dir(cfg) if ev.out_dir or cfg.train else Path(dict_dirs[0]).parent / "eval"
    if cfg.train is None:
        raise ConfigError(cfg.source_file or "<config>", ["train: missing (the browser needs the [train] section "
                                                          "that names the dictionaries, or --dictionary DIR)"])
    names = ev.dictionaries or [d.name for d in cfg.train.dictionaries]
    return {n: Path(cfg.train.out_dir) / n for n in names}, eval_dir(cfg)


def browse(cfg: EvalExperiment, *, options: Mapping | None = None, dict_dirs=None, out: str | Path | None = None,
           progress: bool = True, log: Callable[..., None] = print) -> dict[str, dict]:
    """Build the browser of every dictionary (or of `dict_dirs`); returns {name: summary}."""
    from pipeline import experiment as E
    from pipeline import models as M

    spec = browser_spec(options)
    dirs, ev_dir = dictionary_dirs(cfg, dict_dirs)
    ev_dir = Path(out) if out else ev_dir
    missing = [str(d) for d in dirs.values() if not (d / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"no config.json in {', '.join(missing)}: not trained (or imported) yet; "
                                f"run: mdiff train {cfg.source_file or '<config>'}")
    ev = cfg.eval or EvalSpec()
    tokenizer, _ = E.experiment_tokenizer(cfg)
    models_cache: dict = {}
    results = {}
    for name, d in dirs.items():
        log(f"{name}: building the latent browser ({spec.rows:,} rows at most)")
        res = build_browser(d, cfg, ev, ev_dir / name, spec=spec, tokenizer=tokenizer,
                            device=M.resolve_device(ev.device), progress=progress, models_cache=models_cache, log=log)
        log(f"  {name}: {res['n_latents']:,} latents, {res['rows']:,} tokens scanned, "
            f"{res['bytes'] / 1e6:.1f} MB in {res['seconds']:.1f} s: {res['index_html']}")
        results[name] = res
    return results


def export_latent(cfg: EvalExperiment, dictionary: str | None, latent: int, *, dict_dirs=None,
                  out: str | Path | None = None) -> Path:
    """Write one latent of a built browser as JSON (<browser>/exports/latent-<id>.json).
    `dictionary` names it; None: the experiment's only dictionary."""
    dirs, ev_dir = dictionary_dirs(cfg, dict_dirs)
    ev_dir = Path(out) if out else ev_dir
    if dictionary is None and len(dirs) == 1:
        dictionary = next(iter(dirs))
    if dictionary not in dirs:
        raise ConfigError(cfg.source_file or "<config>", [f"--name {dictionary!r}: name one of the dictionaries "
                                                          f"{', '.join(dirs)}"])
    browser = ev_dir / dictionary / BROWSER_DIR
    if not (browser / "data" / "meta.js").is_file():
        raise FileNotFoundError(f"no latent browser in {browser}: build it first with mdiff browse "
                                f"{cfg.source_file or '<config>'}")
    try:
        record = latent_json(browser, latent)
    except ValueError as e:
        raise ConfigError(str(browser), [f"--export-latent: {e}"]) from None
    path = browser / "exports" / f"latent-{latent}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return path
