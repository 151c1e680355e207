"""Model-diff analyses of a trained dictionary: what differs between the models, latent by latent.

Three analyses, each a pure function of tensors, plus one driver that reads a training output and
the store and writes the files:

1. Decoder norms (crosscoders). Latent j has one decoder vector per model, d_ij = W_dec[j, i];
   model i's *share* is s_ij = ||d_ij|| / sum_k ||d_kj|| (shares sum to 1). With two models the
   *relative norm* is r_j = ||d_B|| / (||d_A|| + ||d_B||) = s_Bj (Anthropic's model-diffing plot;
   0 = only model A uses the latent, 1 = only model B). Classes, thresholds from [eval]:

     two models   "<A>-only"  r < specific_below
                  "<B>-only"  r > specific_above
                  "shared"    shared_band[0] <= r <= shared_band[1]
                  "other"     anything else
     n models     "<i>-only"  s_i > specific_above, i the model with the largest share
                  "shared"    every s_i >= (2 / n) * min(shared_band[0], 1 - shared_band[1]),
                              i.e. every model holds at least 2*low times the uniform share 1/n
                  "other"     anything else
     any          "dead"      all decoder vectors are zero (no share is defined)

   The n-model rule gives the two-model classes when the thresholds are symmetric (the defaults
   0.1 / 0.9 and [0.3, 0.7] are). The cosine similarity of a latent's decoder vectors (two
   models: cos(d_A, d_B); n models: the mean over pairs) says whether a shared latent means the
   same direction in every model. Model-specificity is max_i s_i - 1/n (= |r - 0.5| for two).

2. Activation statistics: the dictionary applied (eval mode) to the models' normalized
   activations at the same validation tokens. An SAE trained on model A is applied to each
   model separately (one column per model: base vs chat, checkpoint vs checkpoint); a
   crosscoder to the joint input (one column, "joint"). Per latent and column: firing frequency,
   mean over all tokens, mean over the tokens where it fires; optionally per token class
   (TokenClassSpec: listed token strings, a regex on the decoded token, or special/added tokens
   such as chat-template markers).

3. Top-activating contexts: the `contexts_per_latent` largest activations of chosen latents,
   found in one streaming pass with a running top-k, decoded with `context_tokens` tokens each
   side.

Position 0 of every sequence (BOS, an attention-sink outlier) is skipped unless the dictionary
was trained with `include_first_position`, so statistics describe the tokens it was trained on.
"""

from __future__ import annotations

import csv
import json
import math
import re
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from evals.config import EvalExperiment as ExperimentConfig
from evals.config import EvalSpec, TokenClassSpec
from pipeline import experiment as E
from pipeline import store as S
from trainer.trained import open_trained

from . import latent_page as P

SHARED, OTHER, DEAD = "shared", "other", "dead"
JOINT = "joint"  # the column name of a crosscoder's (joint) activations


def only(name: str) -> str:
    """The class of latents specific to model `name`."""
    return f"{name}-only"


# ================================================================================================
# 1. Decoder norms
# ================================================================================================


@dataclass
class NormAnalysis:
    """Per-latent decoder norms of a crosscoder, their shares, classes and cosine similarities."""

    model_names: list[str]
    norms: np.ndarray  # [n_latents, n_models] ||W_dec[j, i]||
    shares: np.ndarray  # [n_latents, n_models] norms / norms.sum(1); NaN for dead latents
    classes: np.ndarray  # [n_latents] class names (str)
    cosine: np.ndarray  # [n_latents] (mean pairwise) cosine of the decoder vectors; NaN if one is 0
    thresholds: dict  # the rule's thresholds, as used

    @property
    def n_latents(self) -> int:
        return self.norms.shape[0]

    @property
    def n_models(self) -> int:
        return self.norms.shape[1]

    @property
    def relative(self) -> np.ndarray | None:
        """[n_latents] r = ||d_B|| / (||d_A|| + ||d_B||) for two models (NaN when dead), else None."""
        return self.shares[:, 1] if self.n_models == 2 else None

    @property
    def class_names(self) -> list[str]:
        return [only(n) for n in self.model_names] + [SHARED, OTHER, DEAD]

    @property
    def counts(self) -> dict[str, int]:
        return {c: int((self.classes == c).sum()) for c in self.class_names}

    def ids(self, cls: str) -> np.ndarray:
        """Latent ids of one class, ascending."""
        return np.flatnonzero(self.classes == cls)

    @property
    def shared_cosine(self) -> np.ndarray:
        """Cosine similarities of the shared latents (finite values only)."""
        c = self.cosine[self.classes == SHARED]
        return c[np.isfinite(c)]

    @property
    def specificity(self) -> np.ndarray:
        """[n_latents] max_i share_i - 1/n: 0 = perfectly balanced, 1 - 1/n = one model only; NaN dead."""
        return np.max(self.shares, axis=1) - 1.0 / self.n_models

    @property
    def favoured(self) -> np.ndarray:
        """[n_latents] the model with the largest share (-1 for dead latents)."""
        out = np.full(self.n_latents, -1, dtype=np.int64)
        alive = self.classes != DEAD
        out[alive] = np.argmax(self.shares[alive], axis=1)
        return out

    def summary(self) -> dict:
        cos = self.shared_cosine
        return {"models": list(self.model_names), "n_latents": self.n_latents,
                "counts": self.counts, "thresholds": self.thresholds,
                "shared_cosine": {"n": int(cos.size),
                                  "mean": float(cos.mean()) if cos.size else None,
                                  "median": float(np.median(cos)) if cos.size else None,
                                  "below_0.5": int((cos < 0.5).sum())}}


def _as_tensor(w) -> Tensor:
    return w.detach().to("cpu", torch.float64) if isinstance(w, Tensor) else torch.as_tensor(
        np.asarray(w), dtype=torch.float64)


def decoder_norm_analysis(W_dec: Tensor | np.ndarray, model_names: Sequence[str] | None = None,
                          spec: EvalSpec | None = None, *, block: int = 8192) -> NormAnalysis:
    """Norms, shares, classes and cosines of W_dec [n_latents, n_models, d_model] (n_models >= 2).

    Thresholds come from `spec` (default EvalSpec()); the class rules are in the module docstring.
    Use the unfolded dictionary: folding divides model i's decoder by its scale and would move
    every share.
    """
    spec = spec or EvalSpec()
    w_all = W_dec.detach() if isinstance(W_dec, Tensor) else torch.as_tensor(np.asarray(W_dec))
    if w_all.dim() != 3 or w_all.shape[1] < 2:
        raise ValueError(f"need W_dec [n_latents, n_models >= 2, d_model], got {tuple(w_all.shape)}")
    m, n, _ = w_all.shape
    names = list(model_names) if model_names is not None else [f"model{i}" for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} model names for {n} models")
    norms = np.empty((m, n))
    cosine = np.empty(m)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for lo in range(0, m, block):  # blocks: a float64 copy of a 131k x 2 x 2304 decoder is 5 GB
        w = _as_tensor(w_all[lo:lo + block])
        nrm = w.norm(dim=-1)
        unit = w / nrm.clamp_min(1e-300)[..., None]
        cos = sum((unit[:, i] * unit[:, j]).sum(-1) for i, j in pairs) / len(pairs)
        cos[(nrm == 0).any(1)] = float("nan")
        norms[lo:lo + block] = nrm.numpy()
        cosine[lo:lo + block] = cos.numpy()

    total = norms.sum(1)
    dead = ~(total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = norms / total[:, None]
    shares[dead] = np.nan
    classes = np.full(m, OTHER, dtype=object)
    lo_b, hi_b = spec.shared_band
    if n == 2:
        r = np.nan_to_num(shares[:, 1], nan=-1.0)  # dead latents match no rule (set below)
        classes[(r >= lo_b) & (r <= hi_b)] = SHARED
        classes[(r < spec.specific_below) & (r >= 0)] = only(names[0])
        classes[r > spec.specific_above] = only(names[1])
        thresholds = {"rule": "relative norm r = |d_B| / (|d_A| + |d_B|)",
                      "specific_below": spec.specific_below, "specific_above": spec.specific_above,
                      "shared_band": [lo_b, hi_b]}
    else:
        floor = 2.0 / n * min(lo_b, 1.0 - hi_b)
        s = np.nan_to_num(shares, nan=-1.0)
        classes[np.all(s >= floor, axis=1)] = SHARED
        top = s.argmax(1)
        specific = s.max(1) > spec.specific_above
        classes[specific] = np.array([only(x) for x in names], dtype=object)[top[specific]]
        thresholds = {"rule": "share s_i = |d_i| / sum_k |d_k|", "specific_above": spec.specific_above,
                      "shared_min_share": floor}
    classes[dead] = DEAD
    return NormAnalysis(names, norms, shares, classes.astype(str), cosine, thresholds)


# ---------------------------------------------------------------------------------------- plots


def _figure(n_rows: int = 1, n_cols: int = 1, size=(7.0, 3.6)):
    """A matplotlib Figure with the Agg canvas: no pyplot, no global backend, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * n_cols, size[1] * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, axes


def _norm_marks(a: NormAnalysis) -> list[tuple[float, str]]:
    t = a.thresholds
    if a.n_models == 2:
        return [(t["specific_below"], f"{only(a.model_names[0])} below"),
                (t["shared_band"][0], "shared from"), (t["shared_band"][1], "shared to"),
                (t["specific_above"], f"{only(a.model_names[1])} above")]
    return [(t["shared_min_share"], "shared: every share above"),
            (t["specific_above"], "specific above")]


def _hist_png(ax, values: np.ndarray, edges: np.ndarray, *, title: str, xlabel: str, log_y: bool,
              marks: Sequence[tuple[float, str]] = (), spans: Sequence[tuple[float, float, str, str]] = ()):
    for lo, hi, color, label in spans:
        ax.axvspan(lo, hi, color=color, alpha=0.12, lw=0, label=label)
    ax.hist(values, bins=edges, color="#4c78a8")
    for x, label in marks:
        ax.axvline(x, color="#d62728", ls="--", lw=0.9)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latents" + (" (log scale)" if log_y else ""))
    if spans:
        ax.legend(loc="upper center", fontsize=8, frameon=False, ncol=len(spans))


@dataclass
class _Panel:
    values: np.ndarray
    edges: np.ndarray
    title: str
    xlabel: str
    marks: list = field(default_factory=list)
    spans: list = field(default_factory=list)


def _norm_panels(a: NormAnalysis, bins: int, head: str) -> list[_Panel]:
    """Two models: r with the class regions; more: one share histogram per model. Dead left out."""
    alive = a.classes != DEAD
    edges = np.linspace(0.0, 1.0, bins + 1)
    if a.n_models == 2:
        (na, nb), t = a.model_names, a.thresholds
        spans = [(0, t["specific_below"], "#d62728", only(na)),
                 (t["shared_band"][0], t["shared_band"][1], "#2ca02c", SHARED),
                 (t["specific_above"], 1, "#9467bd", only(nb))]
        return [_Panel(a.relative[alive], edges, f"{head}relative decoder norms ({int(alive.sum())} latents)",
                       f"relative decoder norm |d_{nb}| / (|d_{na}| + |d_{nb}|)", _norm_marks(a), spans)]
    return [_Panel(a.shares[alive, i], edges, f"{head}decoder norm share of {name}",
                   f"|d_{name}| / sum of decoder norms", _norm_marks(a)) for i, name in enumerate(a.model_names)]


def _cosine_panel(a: NormAnalysis, bins: int, head: str) -> _Panel:
    pair = "cos(d_A, d_B)" if a.n_models == 2 else "mean pairwise cosine"
    cos = a.shared_cosine
    return _Panel(cos, np.linspace(-1.0, 1.0, bins + 1),
                  f"{head}decoder cosine similarity of {cos.size} shared latents",
                  f"{pair} of the decoder vectors")


def _svg(p: _Panel, log_y: bool, height: int = 300) -> str:
    counts, _ = np.histogram(p.values, bins=p.edges)
    return P.svg_histogram(counts, p.edges, title=p.title, xlabel=p.xlabel, log_y=log_y, marks=p.marks,
                           height=height)


def norm_svgs(a: NormAnalysis, *, log_y: bool = False, cosine_log_y: bool = True, bins: int = 100,
              title: str = "") -> list[str]:
    """The relative-norm (n > 2: per-model share) histograms and the shared-latent cosine
    histogram as inline SVG with hover tooltips."""
    head = f"{title}: " if title else ""
    panels = _norm_panels(a, bins, head)
    height = 300 if len(panels) == 1 else 230
    return [_svg(p, log_y, height) for p in panels] + [_svg(_cosine_panel(a, bins, head), cosine_log_y)]


def write_norm_plots(a: NormAnalysis, out_dir: str | Path, *, log_y: bool = False, bins: int = 100,
                     cosine_log_y: bool = True, title: str = "") -> dict[str, Path]:
    """relative_norms.png, shared_cosine.png and relative_norms.html (the same histograms as SVG).

    Two models: the histogram of r with the class thresholds marked and the class regions shaded.
    More models: one histogram of the shares per model. Dead latents are left out of both.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = f"{title}: " if title else ""
    paths = {"relative_norms_png": out / "relative_norms.png", "shared_cosine_png": out / "shared_cosine.png",
             "relative_norms_html": out / "relative_norms.html"}
    panels = _norm_panels(a, bins, head)
    fig, axes = _figure(len(panels), 1, size=(7.0, 3.6 if len(panels) == 1 else 2.6))
    for ax, p in zip(axes[:, 0], panels):
        _hist_png(ax, p.values, p.edges, title=p.title, xlabel=p.xlabel, log_y=log_y, marks=p.marks,
                  spans=p.spans)
    fig.savefig(paths["relative_norms_png"], dpi=120)
    p = _cosine_panel(a, bins, head)
    fig, axes = _figure()
    _hist_png(axes[0, 0], p.values, p.edges, title=p.title, xlabel=p.xlabel, log_y=cosine_log_y)
    fig.savefig(paths["shared_cosine_png"], dpi=120)

    svgs = norm_svgs(a, log_y=log_y, cosine_log_y=cosine_log_y, bins=bins, title=title)
    body = (P.table(list(a.counts.items()), header=("class", "latents"), css="counts")
            + "".join(f"<figure>{s}</figure>" for s in svgs)
            + '<p class="note">Hover a bar for its bin and count. Thresholds: '
            + P.esc(json.dumps(a.thresholds)) + "</p>")
    paths["relative_norms_html"].write_text(P.html_document(f"{head}decoder norms", body), encoding="utf-8")
    return paths


# ================================================================================================
# Tokens: decoded strings and token classes
# ================================================================================================


@dataclass
class TokenTable:
    """Every token id decoded once, and the ids of special / added tokens."""

    strings: list[str]
    special_ids: frozenset[int]

    @property
    def vocab_size(self) -> int:
        return len(self.strings)

    def decode(self, i: int) -> str:
        return self.strings[i] if 0 <= i < len(self.strings) else f"<id {i}>"

    def lookup(self, spec: TokenClassSpec) -> np.ndarray:
        """[vocab_size] bool: which token ids belong to the class.

        tokens  the decoded token string equals one of `values` exactly (" the" and "the" differ)
        regex   re.search of any of `values` matches the decoded token string
        special the id is a special or added token (BOS, EOS, chat markers); with `values`, only
                those whose string is listed
        """
        if spec.kind == "tokens":
            wanted = set(spec.values)
            return np.fromiter((s in wanted for s in self.strings), bool, len(self.strings))
        if spec.kind == "regex":
            pats = [re.compile(v) for v in spec.values]
            return np.fromiter((any(p.search(s) for p in pats) for s in self.strings), bool,
                               len(self.strings))
        if spec.kind == "special":
            out = np.zeros(len(self.strings), bool)
            ids = [i for i in self.special_ids if 0 <= i < len(self.strings)]
            if spec.values:
                ids = [i for i in ids if self.strings[i] in set(spec.values)]
            out[ids] = True
            return out
        raise ValueError(f"token class {spec.name!r}: unknown kind {spec.kind!r} (tokens, regex or special)")


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_table(tokenizer) -> TokenTable:
    """The tokenizer's vocabulary decoded id by id, computed once per tokenizer object."""
    if isinstance(tokenizer, TokenTable):
        return tokenizer
    try:
        return _TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | set(added)
    size = max([len(tokenizer), *(i + 1 for i in special)])
    strings = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    table = TokenTable(list(strings), frozenset(int(i) for i in special))
    try:
        _TABLES[tokenizer] = table
    except TypeError:  # not weak-referenceable: no cache
        pass
    return table


def select_token_class(spec: TokenClassSpec, token_ids, tokenizer) -> np.ndarray:
    """bool mask over `token_ids` (any shape): the positions of the class."""
    lookup = token_table(tokenizer).lookup(spec)
    ids = np.asarray(token_ids, dtype=np.int64)
    ok = (ids >= 0) & (ids < lookup.size)
    return np.where(ok, lookup[np.clip(ids, 0, lookup.size - 1)], False)


# ================================================================================================
# 2 + 3. One streaming pass: activation statistics and running top-k
# ================================================================================================


@dataclass
class Batch:
    """Rows of the same tokens in every model: row ids, token ids, one [b, d] input per model."""

    rows: Tensor  # [b] int64 row index into the scanned block (seq * context_length + pos)
    token_ids: Tensor  # [b] int64
    inputs: list[Tensor]  # per model: [b, d_model] normalized activations


@dataclass
class ActivationStats:
    """Per column (model, or "joint") and latent: firing frequency, mean, mean when active."""

    columns: list[str]
    n_tokens: int
    freq: np.ndarray  # [n_columns, n_latents] fraction of tokens with f > 0
    mean: np.ndarray  # [n_columns, n_latents] mean of f over all tokens
    mean_active: np.ndarray  # [n_columns, n_latents] mean of f where f > 0 (0 if never active)
    by_class: dict[str, ActivationStats] = field(default_factory=dict)

    def col(self, name: str) -> int:
        return self.columns.index(name)


@dataclass
class TopActivations:
    """The k largest activations of each tracked latent: values and rows, descending (<= 0: none)."""

    latents: np.ndarray  # [l]
    values: np.ndarray  # [l, k]
    rows: np.ndarray  # [l, k] (-1 where fewer than k tokens were seen)

    def of(self, latent: int) -> list[tuple[float, int]]:
        """(value, row) pairs of one latent with a positive activation, largest first."""
        idx = np.flatnonzero(self.latents == latent)
        if idx.size == 0:
            raise KeyError(f"latent {latent} was not tracked")
        v, r = self.values[idx[0]], self.rows[idx[0]]
        return [(float(a), int(b)) for a, b in zip(v, r) if a > 0 and b >= 0]


class _Sums:
    def __init__(self, n_cols: int, n_latents: int, device):
        self.total = torch.zeros(n_cols, n_latents, dtype=torch.float64, device=device)
        self.active = torch.zeros(n_cols, n_latents, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, c: int, f: Tensor, weight: Tensor | None = None) -> None:
        if weight is None:
            self.total[c] += f.sum(0, dtype=torch.float64)
            self.active[c] += (f > 0).sum(0, dtype=torch.float64)
        else:  # a 0/1 row mask as a matmul: no copy of the selected rows
            self.total[c] += (weight @ f).double()
            self.active[c] += (weight @ (f > 0).to(f.dtype)).double()

    def stats(self, columns: list[str]) -> ActivationStats:
        total, active = self.total.cpu().numpy(), self.active.cpu().numpy()
        n = max(self.n, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_active = np.where(active > 0, total / np.maximum(active, 1), 0.0)
        return ActivationStats(list(columns), self.n, active / n, total / n, mean_active)


class _TopK:
    """Running top-k over rows for a set of latents (None: all), merged batch by batch."""

    def __init__(self, latents: Sequence[int] | None, n_latents: int, k: int, device):
        self.index = None if latents is None else torch.as_tensor(list(latents), dtype=torch.long,
                                                                  device=device)
        l = n_latents if latents is None else len(self.index)
        self.latents = np.arange(n_latents) if latents is None else np.asarray(list(latents), np.int64)
        self.k = k
        self.values = torch.full((k, l), -math.inf, device=device)
        self.rows = torch.full((k, l), -1, dtype=torch.long, device=device)

    def update(self, f: Tensor, rows: Tensor) -> None:
        v = f if self.index is None else f.index_select(1, self.index)
        if v.shape[1] == 0 or v.shape[0] == 0:
            return
        tv, ti = v.topk(min(self.k, v.shape[0]), dim=0)
        vals = torch.cat([self.values, tv.float()])
        rws = torch.cat([self.rows, rows[ti]])
        self.values, pick = vals.topk(self.k, dim=0)
        self.rows = rws.gather(0, pick)

    def result(self) -> TopActivations:
        return TopActivations(self.latents, self.values.T.cpu().numpy(), self.rows.T.cpu().numpy())


def encode_columns(dictionary, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Codes per column: an SAE encodes each model's input alone, a crosscoder all of them jointly."""
    if dictionary.n_models == 1:
        return [dictionary.encode(x[:, None, :]) for x in inputs]
    if len(inputs) != dictionary.n_models:
        raise ValueError(f"a {dictionary.n_models}-model crosscoder needs {dictionary.n_models} inputs, "
                         f"got {len(inputs)}")
    return [dictionary.encode(torch.stack(list(inputs), dim=1))]


@dataclass
class ScanResult:
    stats: ActivationStats
    top: dict[str, TopActivations]  # per column


@torch.no_grad()
def scan_activations(dictionary, batches: Iterable[Batch], *, columns: Sequence[str],
                     class_lookups: Mapping[str, np.ndarray] | None = None, top_k: int = 0,
                     track: Mapping[str, Sequence[int] | None] | None = None,
                     device: str | torch.device = "cpu") -> ScanResult:
    """Statistics of every latent and the running top-k of the tracked latents, in one pass.

    `columns` names the code columns (`encode_columns`: one per model for an SAE, one for a
    crosscoder). `class_lookups` maps a token class to a [vocab] bool lookup (TokenTable.lookup).
    `track` maps a column to the latents whose top-k rows to keep (None: all latents); columns
    not named are not tracked. The dictionary is put in eval mode.
    """
    dictionary.eval()
    columns = list(columns)
    m = dictionary.n_latents
    lookups = {name: torch.as_tensor(lut, dtype=torch.bool, device=device)
               for name, lut in (class_lookups or {}).items()}
    sums = _Sums(len(columns), m, device)
    class_sums = {name: _Sums(len(columns), m, device) for name in lookups}
    trackers = {c: _TopK(lat, m, top_k, device) for c, lat in (track or {}).items() if top_k > 0}
    for batch in batches:
        rows = batch.rows.to(device)
        ids = batch.token_ids.to(device)
        codes = encode_columns(dictionary, [x.to(device, torch.float32) for x in batch.inputs])
        if len(codes) != len(columns):
            raise ValueError(f"{len(codes)} code columns but {len(columns)} column names")
        sums.n += rows.shape[0]
        weights = {}
        for name, lut in lookups.items():
            mask = lut[ids.clamp(0, lut.numel() - 1)] & (ids >= 0) & (ids < lut.numel())
            weights[name] = mask.float()
            class_sums[name].n += int(mask.sum())
        for c, (name, f) in enumerate(zip(columns, codes)):
            sums.add(c, f)
            for cls, w in weights.items():
                class_sums[cls].add(c, f, w)
            if name in trackers:
                trackers[name].update(f, rows)
    stats = sums.stats(columns)
    stats.by_class = {name: s.stats(columns) for name, s in class_sums.items()}
    return ScanResult(stats, {c: t.result() for c, t in trackers.items()})


def tensor_batches(inputs: Sequence[Tensor], token_ids: Tensor | None = None, *,
                   batch_rows: int = 4096) -> Iterator[Batch]:
    """Batches over in-memory activations [N, d] (one per model) and their token ids [N]."""
    n = inputs[0].shape[0]
    if any(x.shape[0] != n for x in inputs):
        raise ValueError("every model's activations need the same number of rows")
    ids = torch.zeros(n, dtype=torch.long) if token_ids is None else torch.as_tensor(token_ids).long().reshape(-1)
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        yield Batch(torch.arange(lo, hi), ids[lo:hi], [x[lo:hi] for x in inputs])


def activation_stats(dictionary, activations: Mapping[str, Tensor], *, token_ids: Tensor | None = None,
                     token_classes: Sequence[TokenClassSpec] = (), tokenizer=None,
                     batch_rows: int = 4096, device: str | torch.device = "cpu") -> ActivationStats:
    """Statistics of a dictionary on in-memory normalized activations {model name: [N, d_model]}.

    An SAE gives one column per model; a crosscoder one "joint" column (inputs in mapping order).
    Token classes need `token_ids` [N] and the `tokenizer` (or a TokenTable).
    """
    names = list(activations)
    columns = names if dictionary.n_models == 1 else [JOINT]
    lookups = {}
    if token_classes:
        if token_ids is None or tokenizer is None:
            raise ValueError("token classes need token_ids and a tokenizer")
        table = token_table(tokenizer)
        lookups = {c.name: table.lookup(c) for c in token_classes}
    batches = tensor_batches([activations[n] for n in names], token_ids, batch_rows=batch_rows)
    return scan_activations(dictionary, batches, columns=columns, class_lookups=lookups,
                            device=device).stats


def store_batches(arrays: Sequence[S.ActivationArray], tokens: np.ndarray, first_row: int, *,
                  batch_rows: int, include_first_position: bool = False,
                  progress: bool = False) -> Iterator[Batch]:
    """Batches of the same rows of every array: the sequences `tokens` [n_seq, ctx] that start at
    store row `first_row`. Rows in the batches are relative to that block."""
    n_seq, ctx = tokens.shape
    n = n_seq * ctx
    flat = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, unit="tok", desc="scan", dynamic_ncols=True)
    for lo in range(0, n, batch_rows):
        hi = min(lo + batch_rows, n)
        rows = torch.arange(lo, hi)
        xs = [S.read_rows(a, first_row + lo, first_row + hi).float() for a in arrays]
        if not include_first_position:
            keep = rows % ctx != 0
            rows, xs = rows[keep], [x[keep] for x in xs]
        yield Batch(rows, flat[rows], xs)
        if bar is not None:
            bar.update(hi - lo)
    if bar is not None:
        bar.close()


# ---------------------------------------------------------------------------------------- ranking


def rank_specific(a: NormAnalysis, top: int) -> dict[int, np.ndarray]:
    """Per model i: the `top` live latents whose largest share is model i's, most specific first
    (two models: by |r - 0.5| descending, split by the side of 0.5)."""
    spec, fav = a.specificity, a.favoured
    out = {}
    for i in range(a.n_models):
        ids = np.flatnonzero(fav == i)
        order = np.argsort(-spec[ids], kind="stable")
        out[i] = ids[order][:top]
    return out


def rank_increase(stats: ActivationStats, a: str, b: str, *, metric: str = "freq", top: int = 50,
                  decrease: bool = False) -> np.ndarray:
    """Latents by the increase of `metric` (freq, mean or mean_active) from column a to column b,
    largest first (`decrease`: largest decrease first). Only latents active on a or b."""
    values = getattr(stats, metric)
    delta = values[stats.col(b)] - values[stats.col(a)]
    if decrease:
        delta = -delta
    alive = np.flatnonzero((stats.freq[stats.col(a)] > 0) | (stats.freq[stats.col(b)] > 0))
    order = np.argsort(-delta[alive], kind="stable")
    return alive[order][:top]


# ---------------------------------------------------------------------------------------- contexts


def context_snippets(top: TopActivations, latents: Iterable[int], tokens: np.ndarray, table: TokenTable,
                     *, context_tokens: int, seq_offset: int = 0, row_offset: int = 0
                     ) -> dict[int, list[P.Snippet]]:
    """Decoded snippets of the top activations: `context_tokens` tokens each side, within the
    sequence. `tokens` is the scanned block [n_seq, ctx]; offsets map it back to the token set and
    the store rows."""
    ctx = tokens.shape[1]
    out = {}
    for latent in latents:
        snips = []
        for value, row in top.of(int(latent)):
            seq, pos = divmod(row, ctx)
            ids = tokens[seq]
            lo, hi = max(0, pos - context_tokens), min(ctx, pos + context_tokens + 1)
            snips.append(P.Snippet(value=value, token=table.decode(int(ids[pos])),
                                   left=[table.decode(int(t)) for t in ids[lo:pos]],
                                   right=[table.decode(int(t)) for t in ids[pos + 1:hi]],
                                   seq=seq + seq_offset, pos=pos, row=row + row_offset))
        out[int(latent)] = snips
    return out


# ================================================================================================
# Files: activation CSV and scatter plot
# ================================================================================================

_STAT_FIELDS = ("freq", "mean", "mean_active")


def write_activation_csv(path: str | Path, stats: ActivationStats, a: str, others: Sequence[str], *,
                         top: int) -> Path:
    """The `top` latents by increase in firing frequency, then by increase in mean activation,
    from column a to each other column b: one row per (ranking, b, latent)."""
    classes = list(stats.by_class)
    header = ["ranking", "model_A", "model_B", "rank", "latent", "freq_A", "freq_B", "mean_A", "mean_B",
              "mean_active_A", "mean_active_B", "delta"]
    header += [f"{c}/{f}_{s}" for c in classes for f in _STAT_FIELDS for s in "AB"]
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for b in others:
            ia, ib = stats.col(a), stats.col(b)
            for metric in ("freq", "mean"):
                values = getattr(stats, metric)
                for rank, j in enumerate(rank_increase(stats, a, b, metric=metric, top=top), 1):
                    row = [metric, a, b, rank, int(j)]
                    for f in _STAT_FIELDS:
                        arr = getattr(stats, f)
                        row += [f"{arr[ia, j]:.6g}", f"{arr[ib, j]:.6g}"]
                    row.append(f"{values[ib, j] - values[ia, j]:.6g}")
                    for c in classes:
                        cs = stats.by_class[c]
                        for f in _STAT_FIELDS:
                            arr = getattr(cs, f)
                            row += [f"{arr[ia, j]:.6g}", f"{arr[ib, j]:.6g}"]
                    w.writerow(row)
    return path


def write_activation_scatter(path: str | Path, stats: ActivationStats, a: str, others: Sequence[str], *,
                             highlight: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Firing frequency on a vs on each b (one panel per b), log-log, with the diagonal. Latents
    that never fire on one side are drawn at 1/(2 n_tokens), below every real frequency."""
    fig, axes = _figure(1, len(others), size=(4.6, 4.4))
    floor = 0.5 / max(stats.n_tokens, 1)
    for ax, b in zip(axes[0], others):
        fa, fb = stats.freq[stats.col(a)], stats.freq[stats.col(b)]
        live = (fa > 0) | (fb > 0)
        x, y = np.maximum(fa[live], floor), np.maximum(fb[live], floor)
        ax.scatter(x, y, s=5, alpha=0.5, color="#4c78a8", lw=0, label=f"{int(live.sum())} latents")
        hi = list((highlight or {}).get(b, []))
        if hi:
            ax.scatter(np.maximum(fa[hi], floor), np.maximum(fb[hi], floor), s=12, color="#d62728",
                       lw=0, label=f"top {len(hi)} by increase")
        lo_ = floor * 0.8
        ax.plot([lo_, 1], [lo_, 1], color="#555", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo_, 1.2)
        ax.set_ylim(lo_, 1.2)
        ax.set_xlabel(f"firing frequency on {a}")
        ax.set_ylabel(f"firing frequency on {b}")
        ax.set_title(f"{a} vs {b}")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


# ================================================================================================
# The driver
# ================================================================================================


@dataclass
class _Inputs:
    """A trained dictionary and the arrays it is applied to, with the validation tokens."""

    dictionary: object
    meta: dict
    name: str
    token_set: S.TokenSet
    columns: list[str]  # code columns: the models (SAE) or [JOINT] (crosscoder)
    arrays: list[S.ActivationArray]  # the inputs, in the order encode_columns takes them
    tokens: np.ndarray  # [n_seq, ctx] the scanned validation sequences
    first_seq: int  # their index in the token set
    include_first: bool


def _open_inputs(dict_dir: Path, cfg: ExperimentConfig, n_sequences: int, device, log) -> _Inputs:
    trained = open_trained(dict_dir, cfg, device=device)
    meta, name, dictionary, root, ts = (trained.meta, trained.name, trained.dictionary, trained.root,
                                        trained.token_set)
    names = trained.models
    arrays = list(trained.arrays)
    columns = [JOINT] if dictionary.n_models > 1 else list(names)
    if dictionary.n_models == 1:  # the SAE on every other model cached at the same hook and width
        hook = E.hook_by_label(cfg, meta["hook"])
        for m in cfg.models:
            if m.name in names:
                continue
            try:
                arr = E.find_array(root, ts.id, m, hook, cfg.source_file)
            except S.StoreError as e:
                log(f"{name}: not comparing with {m.name} ({e})")
                continue
            if arr.array.shape[1] != dictionary.d_model:
                log(f"{name}: not comparing with {m.name} (d_model {arr.array.shape[1]} != {dictionary.d_model})")
                continue
            columns.append(m.name)
            arrays.append(arr)
    first = ts.n_train_sequences
    n_seq = min(n_sequences, ts.n_sequences - first)
    if n_seq <= 0:
        raise ValueError(f"token set {ts.id} has no validation sequences to analyse")
    return _Inputs(dictionary, meta, name, ts, columns, arrays, np.asarray(ts.tokens[first:first + n_seq]),
                   first, trained.include_first_position)


def _check_tokenizer(tokenizer, ts: S.TokenSet, log) -> None:
    from pipeline import models as M

    fp = ts.attrs.get("tokenizer_fingerprint")
    if not fp or isinstance(tokenizer, TokenTable):
        return
    try:
        same = M.tokenizer_fingerprint(tokenizer) == fp
    except Exception:  # noqa: BLE001 - a tokenizer without a fast backend: nothing to compare
        return
    if not same:
        log(f"the tokenizer passed in is not token set {ts.id}'s (fingerprints differ); snippets may be "
            "decoded wrongly")


def analyse_dictionary(dict_dir: str | Path, cfg: ExperimentConfig, eval_spec: EvalSpec | None,
                       out_dir: str | Path, tokenizer, *, n_sequences: int | None = None,
                       device: str | torch.device = "cpu", progress: bool = True,
                       log: Callable[..., None] | None = None) -> dict:
    """Run the analyses that apply to one trained dictionary and write them to `out_dir`.

    Crosscoder: decoder norms (relative_norms.png/.html, shared_cosine.png), one scan of the
    validation tokens on the joint input, and latents.html with the most model-specific latents
    of each model and their top contexts. SAE: when other experiment models are cached at the
    same hook with the same d_model, the SAE is applied to each (config.json's model is A, every
    other model a B): activation_stats.csv, activation_scatter.png, and latents.html with the
    latents that fire more (and less) on each B. Always diff.json: the summary, also returned.

    The first `n_sequences` (default: eval_spec.n_sequences) validation sequences are scanned.
    `tokenizer` is the token set's tokenizer (or a TokenTable); `log` gets notes (skipped models).
    """
    from pipeline import models as M

    log = log or (lambda *_: None)
    spec = eval_spec or cfg.eval or EvalSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = M.resolve_device(device)
    inp = _open_inputs(Path(dict_dir), cfg, n_sequences or spec.n_sequences, dev, log)
    dictionary, meta, name, columns = inp.dictionary, inp.meta, inp.name, inp.columns
    is_cc = dictionary.n_models > 1
    table = token_table(tokenizer)
    _check_tokenizer(tokenizer, inp.token_set, log)
    ctx = inp.token_set.context_length
    summary: dict = {"dictionary": name, "dict_dir": str(dict_dir), "architecture": meta["architecture"],
                     "kind": f"{dictionary.n_models}-model crosscoder" if is_cc else "SAE",
                     "models": list(meta["models"]), "compared_with": columns[1:], "hook": meta["hook"],
                     "n_latents": dictionary.n_latents, "tokenset_id": inp.token_set.id,
                     "validation_sequences": len(inp.tokens), "first_position_included": inp.include_first,
                     "files": {}}

    # crosscoder: the decoder norms say which latents to show before the scan; an SAE's ranking
    # needs the scan's statistics, so every latent's top-k is kept
    analysis = None
    if is_cc:
        analysis = decoder_norm_analysis(dictionary.W_dec, meta["models"], spec)
        paths = write_norm_plots(analysis, out, title=name)
        summary["files"].update({key: p.name for key, p in paths.items()})
        summary.update(analysis.summary())
        chosen = rank_specific(analysis, spec.top_latents)
        track = {JOINT: sorted({int(j) for ids in chosen.values() for j in ids})}
    else:
        track = {c: None for c in columns}

    result = scan_activations(
        dictionary,
        store_batches(inp.arrays, inp.tokens, inp.first_seq * ctx,
                      batch_rows=max(256, min(16384, (1 << 24) // dictionary.n_latents)),
                      include_first_position=inp.include_first, progress=progress),
        columns=columns, class_lookups={c.name: table.lookup(c) for c in spec.token_classes},
        top_k=spec.contexts_per_latent, track=track, device=dev)
    stats = result.stats
    summary["n_tokens"] = stats.n_tokens
    summary["token_classes"] = {c: s.n_tokens for c, s in stats.by_class.items()}

    def snippets(column: str, latents) -> dict[int, list[P.Snippet]]:
        return context_snippets(result.top[column], latents, inp.tokens, table,
                                context_tokens=spec.context_tokens, seq_offset=inp.first_seq,
                                row_offset=inp.first_seq * ctx)

    if is_cc:
        groups = [_crosscoder_group(analysis, i, ids, stats, snippets(JOINT, ids)) for i, ids in chosen.items()]
        counts = analysis.counts
        figures = norm_svgs(analysis, title=name)
    else:
        groups, counts = _sae_groups(stats, spec.top_latents, snippets, out, summary, log)
        summary["counts"] = counts
        figures = []

    page_summary = [("dictionary", f"{name} ({meta['architecture']}, {dictionary.n_latents} latents)"),
                    ("kind", summary["kind"]), ("models", ", ".join(meta["models"])),
                    ("compared with", ", ".join(columns[1:]) or "\u2013"),
                    ("hook", meta["hook"]), ("token set", inp.token_set.id),
                    ("tokens scanned", (f"{stats.n_tokens} ({len(inp.tokens)} validation sequences"
                                        f"{'' if inp.include_first else ', position 0 skipped'})"))]
    if analysis is not None:
        page_summary.append(("class rule", json.dumps(analysis.thresholds)))
    page_summary += [(f"token class {c}", f"{s.n_tokens} tokens") for c, s in stats.by_class.items()]
    P.write_latent_page(out / "latents.html", f"{name}: model diff", page_summary, groups,
                        figures=figures, counts=counts)
    summary["files"]["latents_html"] = "latents.html"
    summary["groups"] = {g.title: [c.latent for c in g.cards] for g in groups}
    summary["files"]["diff_json"] = "diff.json"
    (out / "diff.json").write_text(json.dumps(summary, indent=1, default=_json_default), encoding="utf-8")
    return summary


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _crosscoder_group(a: NormAnalysis, i: int, ids: np.ndarray, stats: ActivationStats,
                      snips: dict[int, list[P.Snippet]]) -> P.LatentGroup:
    names, jc = a.model_names, stats.col(JOINT)
    cards = []
    for j in map(int, ids):
        shares = a.shares[j]
        facts: list[tuple[str, object]] = [("class", a.classes[j])]
        if a.n_models == 2:
            facts.append(("relative norm r", float(shares[1])))
        facts += [(f"decoder norm, {n}", float(a.norms[j, t])) for t, n in enumerate(names)]
        facts += [(f"share, {n}", float(shares[t])) for t, n in enumerate(names)]
        facts += [("decoder cosine", float(a.cosine[j])),
                  ("firing frequency (joint)", float(stats.freq[jc, j])),
                  ("mean activation when active", float(stats.mean_active[jc, j]))]
        facts += [(f"[{c}] firing frequency", float(cs.freq[jc, j])) for c, cs in stats.by_class.items()]
        head = (f"r = {shares[1]:.3f}" if a.n_models == 2 else "shares " + " / ".join(f"{s:.2f}" for s in shares))
        cards.append(P.LatentCard(j, a.classes[j], head, facts, snips[j]))
    return P.LatentGroup(f"Most specific to {names[i]}",
                         f"Live latents whose largest decoder-norm share is {names[i]}'s, by share - 1/n "
                         f"(|r - 0.5| for two models), most specific first.", cards)


def _sae_groups(stats: ActivationStats, top: int, snippets, out: Path, summary: dict, log
                ) -> tuple[list[P.LatentGroup], dict[str, int]]:
    """The SAE's groups (more / less active on each other model), writing the CSV and scatter."""
    a, others = stats.columns[0], stats.columns[1:]
    groups, counts = [], {}
    if not others:
        log(f"{summary['dictionary']}: no other model is cached at {summary['hook']}; showing the most "
            "frequent latents")
        ids = np.argsort(-stats.freq[0], kind="stable")[:top]
        ids = ids[stats.freq[0, ids] > 0]
        groups.append(_sae_group(f"Most frequent latents on {a}", a, ids, stats, a, None, snippets(a, ids)))
    else:
        ups = {b: rank_increase(stats, a, b, metric="freq", top=top) for b in others}
        summary["files"]["activation_stats_csv"] = write_activation_csv(
            out / "activation_stats.csv", stats, a, others, top=top).name
        summary["files"]["activation_scatter_png"] = write_activation_scatter(
            out / "activation_scatter.png", stats, a, others, highlight=ups).name
        summary["activation"] = {}
        for b in others:
            downs = rank_increase(stats, a, b, metric="freq", top=top, decrease=True)
            groups.append(_sae_group(f"Fires more on {b} than on {a}", b, ups[b], stats, a, b, snippets(b, ups[b])))
            groups.append(_sae_group(f"Fires less on {b} than on {a}", a, downs, stats, a, b, snippets(a, downs)))
            fa, fb = stats.freq[stats.col(a)], stats.freq[stats.col(b)]
            counts[f"more often on {b}"] = int((fb > fa).sum())
            counts[f"less often on {b}"] = int((fb < fa).sum())
            summary["activation"][b] = {"l0_A": float(fa.sum()), "l0_B": float(fb.sum()),
                                        "top_freq_increase": [int(j) for j in ups[b][:10]]}
    counts["never active"] = int((stats.freq.max(0) == 0).sum())
    return groups, counts


_ARROW = " \u2192 "


def _sae_group(title: str, column: str, ids, stats: ActivationStats, a: str, b: str | None,
               snips: dict[int, list[P.Snippet]]) -> P.LatentGroup:
    cols = [a] if b is None else [a, b]
    cards = []
    for j in map(int, ids):
        facts = []
        for f, label in (("freq", "firing frequency"), ("mean", "mean activation"),
                         ("mean_active", "mean when active")):
            facts += [(f"{label}, {c}", float(getattr(stats, f)[stats.col(c), j])) for c in cols]
        for cls, cs in stats.by_class.items():
            facts += [(f"[{cls}] firing frequency, {c}", float(cs.freq[cs.col(c), j])) for c in cols]
        head = _ARROW.join(f"{stats.freq[stats.col(c), j]:.2g}" for c in cols)
        cards.append(P.LatentCard(j, "firing frequency " + _ARROW.join(cols), head, facts, snips.get(j, [])))
    return P.LatentGroup(title, f"Contexts are the top activations on {column}'s activations.", cards)
