"""The latent browser: every latent of a dictionary, with its examples, statistics and model
diff, as static pages that open from disk (evals/browser/pages.py has the file layout).

    spec           BrowserSpec: what is collected and shown (validated like a config section)
    collectors     per-latent top-k, histograms with per-bin samples, firing counts (torch ops)
    windows        context windows and the keys that tell identical ones apart
    collect        the streaming pass over the store's validation rows
    examples       top and band examples, and their windows re-encoded
    logit_effects  promoted / suppressed tokens through each model's final norm and unembedding
    modeldiff      decoder norms, both relative-norm conventions, cosines, Latent Scaling's nu, dead
    records        a latent's record and the index table, as JSON
    pages          the HTML, script, style and data files; static_* hold the script and style
    exports        one latent as JSON; Neuronpedia (SAEDashboard batch) files
    build          build_browser: the entry point
"""

from evals.browser.spec import BrowserSpec, browser_spec, rules

__all__ = ["BROWSER_DIR", "BrowserSpec", "browser_spec", "build_browser", "latent_json", "rules"]

_LAZY = {"BROWSER_DIR": "evals.browser.build", "build_browser": "evals.browser.build",
         "latent_json": "evals.browser.exports"}


def __getattr__(name: str):
    """The builder is imported on first use, so that evals.config can import the spec (a config
    section) without importing the builder, which imports evals.config."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evals.browser' has no attribute {name!r}")
