"""The browser's data, latent by latent: what the pages load and the exports write.

A latent's *record* (plain JSON) holds, per column, its activity (density, max, mean when active,
histogram), its model diff (decoder norms, r and delta, cosine, shares, Latent Scaling's nu), its
firing frequency per token-set source and token class, its logit effects per model, and its
examples grouped as top activations then bands:

    {"id", "class", "dead",
     "act": [{"density", "fired", "max", "mean", "hist": {"range", "counts"}}],          # per column
     "diff": {"norms": [..], "r", "delta", "cos", "shares": [..], "nu": [{"pair", "eps", "r", "class"}]},
     "groups": [[freq per column] per group],                                            # meta.groups
     "logits": [{"pos": [[token id, score], ..], "neg": [..]} per model, or null],
     "examples": [[{"band": -1 | b, "lo", "hi", "share", "items": [example, ..]}] per column]}
    example = {"v": activation, "row": store row (sequence row // ctx, position row % ctx),
               "t": [token ids of the window, -1 outside the sequence],
               "a": [activation per token in thousandths of the column's max, -1 not encoded]}

The index is columnar (one list per table column) so 64k latents parse in milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .collect import Collection
from .examples import TOP, Examples
from .logit_effects import LogitEffects
from .modeldiff import DiffStats


def rounded(x, digits: int = 4):
    """A float for JSON with `digits` significant digits; None for NaN / inf."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def rounded_list(a: np.ndarray, digits: int = 4) -> list:
    return [rounded(v, digits) for v in np.asarray(a, dtype=np.float64).reshape(-1)]


class Records:
    """Builds latent records from the pass's results (module docstring)."""

    def __init__(self, coll: Collection, ex: Examples, diff: DiffStats, logits: Sequence[LogitEffects | None]):
        self.coll, self.ex, self.diff, self.logits = coll, ex, diff, list(logits)
        self.n_latents = coll.n_latents
        self.col_max = coll.top_values[:, :, 0]  # [C, L]
        self.fired = np.stack([f["fired"] for f in coll.firing])
        self.total = np.stack([f["total"] for f in coll.firing])
        rows = np.stack([f["group_rows"] for f in coll.firing]) if coll.firing else np.zeros((0, 0))
        gf = np.stack([f["group_fired"] for f in coll.firing])  # [C, G, L]
        with np.errstate(invalid="ignore", divide="ignore"):
            self.group_freq = gf / np.maximum(rows, 1)[:, :, None]
        order = np.lexsort((-ex.value, ex.group, ex.column, ex.latent))  # TOP (-1) first, then bands
        self.order = order
        self.starts = np.searchsorted(ex.latent[order], np.arange(self.n_latents + 1))
        scale = self.col_max[ex.column, ex.latent]
        with np.errstate(invalid="ignore", divide="ignore"):
            q = np.rint(ex.acts / np.where(scale > 0, scale, 1.0)[:, None] * 1000)
        self.quantized = np.where(np.isnan(q), -1, q).astype(np.int32)

    def _examples(self, j: int) -> list[list[dict]]:
        c_n = len(self.coll.columns)
        ex, first = self.ex, self.coll.first_row
        idx = self.order[self.starts[j]:self.starts[j + 1]]
        nb = ex.band_edges.shape[2] - 1
        out: list[list[dict]] = [[] for _ in range(c_n)]
        for c in range(c_n):
            mine = idx[ex.column[idx] == c]
            if self.fired[c, j] == 0:
                continue
            groups = [TOP] + list(range(nb))
            for g in groups:
                sel = mine[ex.group[mine] == g]
                if g == TOP and not len(sel):
                    continue
                items = [{"v": rounded(ex.value[e]), "row": int(first + ex.row[e]),
                          "t": ex.tokens[e].tolist(), "a": self.quantized[e].tolist()} for e in sel]
                group = {"band": int(g), "items": items}
                if g != TOP:
                    edges, share = ex.band_edges[c, j], ex.band_share[c, j]
                    group.update(lo=rounded(edges[nb - 1 - g]), hi=rounded(edges[nb - g]),
                                 share=rounded(share[nb - 1 - g]))
                out[c].append(group)
        return out

    def record(self, j: int, *, logit_hist: bool = False) -> dict:
        coll, d = self.coll, self.diff
        n = max(coll.n_rows, 1)
        act = []
        for c in range(len(coll.columns)):
            b = coll.bins[c]
            fired = int(self.fired[c, j])
            act.append({"density": rounded(fired / n), "fired": fired, "max": rounded(self.col_max[c, j]),
                        "mean": rounded(self.total[c, j] / fired) if fired else 0.0,
                        "hist": {"range": rounded(b["range"][j], 6), "counts": b["counts"][j].tolist()}})
        diff: dict = {"norms": rounded_list(d.norms[j])}
        if d.r is not None:
            diff.update(r=rounded(d.r[j]), delta=rounded(d.delta[j]))
        if d.cosine is not None:
            diff["cos"] = rounded(d.cosine[j])
        if d.shares is not None and len(d.models) > 2:
            diff["shares"] = rounded_list(d.shares[j])
        if d.scaling:
            diff["nu"] = [{"pair": s.pair, "eps": rounded(s.nu_epsilon[j]), "r": rounded(s.nu_r[j]),
                           "class": str(s.classes[j])} for s in d.scaling]
        logits = []
        for lg in self.logits:
            if lg is None:
                logits.append(None)
                continue
            entry = {"pos": [[int(t), rounded(v, 3)] for t, v in zip(lg.top_ids[j], lg.top_values[j])],
                     "neg": [[int(t), rounded(v, 3)] for t, v in zip(lg.bottom_ids[j], lg.bottom_values[j])]}
            if logit_hist:
                entry["hist"] = {"lo": rounded(lg.hist_lo[j]), "hi": rounded(lg.hist_hi[j]),
                                 "counts": lg.hist_counts[j].tolist()}
            logits.append(entry)
        return {"id": int(j), "class": str(d.classes[j]), "dead": bool(d.dead[j]), "act": act, "diff": diff,
                "groups": [rounded_list(self.group_freq[:, g, j]) for g in range(self.group_freq.shape[1])],
                "logits": logits if any(lg is not None for lg in logits) else [],
                "examples": self._examples(j)}

    def block(self, lo: int, hi: int, **kwargs) -> list[dict]:
        return [self.record(j, **kwargs) for j in range(lo, min(hi, self.n_latents))]


def index_table(coll: Collection, diff: DiffStats) -> dict:
    """The index's columns: id, class, the model diff, density and max per column, nu."""
    L = coll.n_latents
    cats = list(dict.fromkeys([*diff.class_names, *sorted(set(diff.classes.tolist()))]))
    code = {c: i for i, c in enumerate(cats)}
    cols = [{"key": "id", "label": "latent", "kind": "int", "values": None, "width": "76px"},
            {"key": "class", "label": "class", "kind": "cat", "cats": cats,
             "values": [code[c] for c in diff.classes.tolist()], "width": "minmax(110px,1.2fr)"}]

    def num(key, label, values, title="", pct=False):
        cols.append({"key": key, "label": label, "kind": "num", "values": rounded_list(values), "title": title,
                     "pct": pct})

    if diff.r is not None:
        num("r", "r", diff.r, "relative decoder norm |d_B| / (|d_A| + |d_B|) (Anthropic)")
        num("delta", "\u0394norm", diff.delta, "Minder et al.: 1/2 ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1)")
    elif diff.shares is not None:
        for i, m in enumerate(diff.models):
            num(f"share:{m}", f"share {m}", diff.shares[:, i], f"{m}'s share of the decoder norm")
    if diff.cosine is not None:
        num("cos", "cos", diff.cosine, "cosine of the models' decoder vectors")
    density = np.stack([f["fired"] for f in coll.firing]) / max(coll.n_rows, 1)
    for c, name in enumerate(coll.columns):
        sfx, lab = ("", "") if len(coll.columns) == 1 else (f":{name}", f" {name}")
        num("density" + sfx, "density" + lab, density[c], f"fraction of {coll.n_rows:,} scanned tokens", pct=True)
        num("max" + sfx, "max act" + lab, coll.top_values[c, :, 0], "largest activation seen")
    if diff.scaling:
        s = diff.scaling[0]
        num("nu_eps", "\u03bd_\u03b5", s.nu_epsilon, f"Latent Scaling nu_epsilon {s.pair}")
        num("nu_r", "\u03bd_r", s.nu_r, f"Latent Scaling nu_r {s.pair}")
        ncats = sorted(set(s.classes.tolist()))
        cols.append({"key": "nu_class", "label": "\u03bd class", "kind": "cat", "cats": ncats,
                     "title": "Latent Scaling class of latents exclusive to a model (genuine, shrinkage, "
                              "decoupling); the others by Minder's Delta (shared, other)",
                     "values": [ncats.index(c) for c in s.classes.tolist()]})
    cols.append({"key": "dead", "label": "dead", "kind": "int", "values": diff.dead.astype(int).tolist()})
    shown = [c["key"] for c in cols if c["key"] != "dead"]
    counts = [[c, int((diff.classes == c).sum())] for c in cats if (diff.classes == c).any()]
    dens_key = "density" if len(coll.columns) == 1 else f"density:{coll.columns[0]}"
    default = "r" if diff.r is not None else dens_key
    return {"n_latents": L, "columns": cols, "shown": shown, "class_counts": counts, "density_key": dens_key,
            "default_sort": default, "default_desc": True}
