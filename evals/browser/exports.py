"""Exports: one latent as JSON, and every latent in Neuronpedia's upload format.

`latent_json` reads a written browser back (its data files are JSON behind a one-line script
wrapper) and returns a latent's record with its tokens decoded and activations in activation
units: the same document the latent page's "Download JSON" button saves.

`write_neuronpedia` writes the batch files of SAEDashboard's NeuronpediaRunner
(sae_dashboard/neuronpedia/neuronpedia_dashboard.py: `NeuronpediaDashboardBatch.to_dict()`,
fields as read by Neuronpedia's utils/neuronpedia-utils/convert-saedashboard-to-neuronpedia-
export.py, which turns them into a Neuronpedia export): one folder per model, `batch-<b>.json`
per block of latents, `{"model_id", "layer", "sae_set", "sae_id_suffix", "features": [...]}`.
Top activations carry bin_min = -1, bin_max = the latent's max, bin_contains = -1, as
SAEDashboard writes them; bands carry their edges and share. Fields we do not compute (neuron
alignment, correlated neurons and features, decoder weight distribution) are empty lists. Token
activations come from the browser's records: thousandths of the latent's max.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.records import atomic_write_text

from .pages import block_file


def _script_json(path: Path, prefix: str) -> object:
    text = path.read_text(encoding="utf-8").strip()
    if not text.startswith(prefix) or not text.endswith(";"):
        raise ValueError(f"{path} is not a browser data file (expected it to start with {prefix!r})")
    body = text[len(prefix):-1]
    return json.loads("[" + body[:-1] + "]" if prefix.endswith("(") else body)


def latent_json(browser_dir: str | Path, latent: int) -> dict:
    """A latent's record from a written browser, tokens decoded (module docstring)."""
    d = Path(browser_dir) / "data"
    meta = _script_json(d / "meta.js", "window.MDIFF_META = ")
    if not 0 <= latent < meta["n_latents"]:
        raise ValueError(f"latent {latent} is outside 0..{meta['n_latents'] - 1}")
    vocab = _script_json(d / "vocab.js", "window.MDIFF_VOCAB = ")
    b = latent // meta["block_size"]
    _, records = _script_json(d / block_file(b), "mdiffBlock(")
    rec = records[latent - b * meta["block_size"]]
    for c, groups in enumerate(rec["examples"]):
        top = rec["act"][c]["max"] or 0.0
        for g in groups:
            for ex in g["items"]:
                ex["tokens"] = [vocab[t] if 0 <= t < len(vocab) else None for t in ex["t"]]
                ex["activations"] = [q / 1000 * top if q >= 0 else None for q in ex["a"]]
    return {"latent": latent, "dictionary": meta["dictionary"], "columns": meta["columns"],
            "models": meta["models"], "record": rec}


def _activation(ex: dict, group: dict, top: float, center: int, vocab: list[str]) -> dict:
    keep = [k for k, t in enumerate(ex["t"]) if t >= 0]
    if group["band"] < 0:
        lo, hi, share = -1, top, -1
    else:
        lo, hi, share = group["lo"], group["hi"], group["share"]
    return {"bin_min": lo, "bin_max": hi, "bin_contains": share,
            "tokens": [vocab[ex["t"][k]] if ex["t"][k] < len(vocab) else f"<id {ex['t'][k]}>" for k in keep],
            "values": [round(ex["a"][k] / 1000 * top, 4) if ex["a"][k] >= 0 else 0.0 for k in keep],
            "qualifying_token_index": keep.index(center)}


def _centres(lo: float, hi: float, n: int) -> list[float]:
    return [round(lo + (i + 0.5) * (hi - lo) / n, 4) for i in range(n)]


def neuronpedia_feature(rec: dict, model: int, meta: dict, vocab: list[str]) -> dict:
    """One latent as a NeuronpediaDashboardFeature dict, for model `model`'s logits."""
    act = rec["act"][0]
    top = act["max"] or 0.0
    R, counts = act["hist"]["range"] or 0.0, act["hist"]["counts"]
    B = len(counts)
    lg = rec["logits"][model] if rec["logits"] and rec["logits"][model] else None
    hist = (lg or {}).get("hist")
    feature = {
        "feature_index": rec["id"],
        **{k: [] for k in ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                           "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                           "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                           "decoder_weights_dist")},
        "neg_str": [vocab[t] if t < len(vocab) else f"<id {t}>" for t, _ in (lg or {}).get("neg", [])],
        "neg_values": [v for _, v in (lg or {}).get("neg", [])],
        "pos_str": [vocab[t] if t < len(vocab) else f"<id {t}>" for t, _ in (lg or {}).get("pos", [])],
        "pos_values": [v for _, v in (lg or {}).get("pos", [])],
        "frac_nonzero": act["density"] or 0.0,
        "freq_hist_data_bar_values": _centres(0.0, R, B),
        "freq_hist_data_bar_heights": [float(c) for c in counts],
        "logits_hist_data_bar_heights": [float(c) for c in hist["counts"]] if hist else [],
        "logits_hist_data_bar_values": _centres(hist["lo"], hist["hi"], len(hist["counts"])) if hist else [],
        "n_prompts_total": int(meta["n_sequences"]),
        "n_tokens_in_prompt": int(meta["context_length"]),
        "dataset": meta.get("tokenset_id", ""),
        "activations": [_activation(ex, g, top, meta["center"], vocab)
                        for g in (rec["examples"][0] if rec["examples"] else []) for ex in g["items"]],
    }
    return feature


def write_neuronpedia(out: str | Path, records, meta: dict, vocab: list[str], spec) -> dict:
    """Batch files per model under `out/<model>/` (module docstring); returns {model: folder}."""
    out = Path(out)
    layer = int(str(meta["hook"]).split(".")[0].removeprefix("layer") or 0)
    meta = {**meta, "n_sequences": -(-meta["n_rows"] // max(meta["context_length"], 1))}
    bs, n = spec.block_size, records.n_latents
    folders = {model: out / model for model in meta["models"]}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for b in range(-(-n // bs)):
        recs = records.block(b * bs, (b + 1) * bs, logit_hist=True)
        for m, (model, folder) in enumerate(folders.items()):
            batch = {"model_id": model, "layer": layer, "sae_set": meta["dictionary"], "sae_id_suffix": "",
                     "features": [neuronpedia_feature(r, m, meta, vocab) for r in recs]}
            atomic_write_text(folder / f"batch-{b}.json", json.dumps(batch, ensure_ascii=False))
    return {model: str(folder) for model, folder in folders.items()}
