"""What the latent browser collects and shows: one typed, validated section.

The browser is sized by these knobs, and they trade detail against time and disk: `rows` bounds
the pass over the store, `top_k`, `bands` x `per_band` and the window bound the examples (and so
the files: about top_k + bands * per_band examples of context_before + context_after + 1 tokens
per latent), `hist_bins` x `samples` bound the per-latent memory of the pass. The section reads
like every other config section (unknown keys rejected, every problem reported at once), so it can
become `[eval.browser]` unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config_checks import check_size
from pipeline.typed_config import Check, ConfigError, Rules, from_mapping, join_key, problem


@dataclass(frozen=True)
class BrowserSpec:
    rows: int = 1_000_000  # stored validation rows scanned (fewer if the split is smaller)
    batch_rows: int = 0  # rows encoded at once; 0: about 16M codes per batch (rows x latents)
    top_k: int = 12  # top activations per latent, over distinct contexts
    bands: int = 5  # activation bands sampled below the top (sae_vis' intervals)
    band_kind: Literal["interval", "quantile"] = "interval"  # equal-width on [0, max] | equal mass
    per_band: int = 2  # examples per band
    hist_bins: int = 32  # activation histogram bins per latent (linear, [0, R), R a power of 2)
    samples: int = 2  # uniform samples kept per histogram bin, from which band examples are drawn
    context_before: int = 10  # tokens shown before the activating token
    context_after: int = 3  # ... and after it
    logit_tokens: int = 10  # promoted and suppressed tokens per latent and model
    logit_effects: bool = True  # load each model's unembedding (off: no model weights are read)
    block_size: int = 256  # latents per data file (the latent page loads one file)
    neuronpedia: bool = False  # also write the SAEDashboard/Neuronpedia batch files
    read_threads: int = 2
    seed: int = 0


def _check(values: dict, where: str, errors: list[str]) -> None:
    for key, minimum, why in [("rows", 1, "stored rows to scan, e.g. 1000000"),
                              ("batch_rows", 0, "rows encoded at once; 0 picks it from the dictionary size"),
                              ("top_k", 1, "top activations per latent, e.g. 12"),
                              ("bands", 0, "activation bands below the top; 0 shows none"),
                              ("per_band", 1, "examples per band"),
                              ("hist_bins", 2, "histogram bins per latent, e.g. 32"),
                              ("samples", 1, "samples kept per histogram bin, e.g. 2"),
                              ("context_before", 0, "tokens before the activating one"),
                              ("context_after", 0, "tokens after the activating one"),
                              ("logit_tokens", 1, "promoted / suppressed tokens per latent"),
                              ("block_size", 1, "latents per data file, e.g. 256"),
                              ("read_threads", 1, "reader threads")]:
        check_size(values, key, where, errors, minimum, why)
    bins = values.get("hist_bins")
    if isinstance(bins, int) and bins >= 2 and bins & (bins - 1):
        problem(errors, join_key(where, "hist_bins"), f"is {bins}, not a power of two",
                "use 16, 32 or 64: bins are merged in pairs when a latent's range doubles")
    if values.get("block_size", 0) > 65536:
        problem(errors, join_key(where, "block_size"), f"is {values['block_size']}",
                "keep data files small: at most 65536 latents per file (256 loads in milliseconds)")


def rules() -> dict[type, Check]:
    """The section's checks, for a config that embeds it (e.g. [eval.browser])."""
    return {BrowserSpec: _check}


def browser_spec(data: Mapping[str, Any] | None = None, where: str = "browser",
                 source: str = "<browser options>") -> BrowserSpec:
    """A BrowserSpec from plain data (a TOML table, command-line options), refusing every
    unknown key and bad value at once."""
    errors: list[str] = []
    spec = from_mapping(BrowserSpec, dict(data or {}), where, errors, Rules(checks=rules()))
    if errors or spec is None:
        raise ConfigError(source, errors or [f"{where}: invalid"])
    return spec
