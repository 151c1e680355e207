"""Synthetic activations whose features and true L0 are known: a ground truth for dictionaries.

A real model never says which features it uses, so nothing tells whether a dictionary found them
or what L0 to train at. Here the features are chosen:

    x = sum_i a_i f_i        f_i: unit directions in d_model dimensions (orthonormal when d_model
                             >= n_features, so features never interfere)
    a_i = fires_i * relu(mean + std * eps_i)
    fires_i = z_i > Phi^-1(1 - p_i),   z ~ N(0, C)

Firing goes through a Gaussian copula: feature i fires with probability exactly p_i, and the
correlation matrix C makes features fire together (or avoid each other), which is what makes a
dictionary trained at the wrong L0 mix them. The true L0 is sum_i p_i.

The samples are written into an ordinary mdiff store through the store module's records: a
token set, one activation array with the cache job's attributes and normalization scale, each
shard written whole then recorded with its chunk checksums, and the completion record. The
generator lives in a "model directory" (its tensors as safetensors, a tokenizer), so a plain
experiment config names it like a checkpoint and `mdiff train`, the loader and `mdiff verify`
read the store unchanged. Rows are a pure function of (seed, shard), so a killed write resumes
and ends bit-identical. The token set's tokens are placeholders (BOS, then a row token): the
activations depend on no token, so splicing evaluations do not apply to such a store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mdiff.config import ExperimentConfig, load_config
from pipeline import experiment as E
from pipeline import models as M
from pipeline import store as S
from pipeline.cache import array_attrs, token_set_attrs
from pipeline.config import StorageDtype
from pipeline.records import canonical_json
from pipeline.typed_config import join_key, problem

GENERATOR_FILE = "generator.safetensors"
DESCRIPTION_FILE = "generator.json"  # readable spec; also the token set's (hashed) source file
FORMAT = "mdiff-synthetic"
FORMAT_VERSION = 1
ROW_TOKEN = "<|row|>"
HOOK_LABEL = "layer0.resid_post"
_MIN_EIGENVALUE = 1e-4  # floor when a requested correlation matrix is made positive definite
_TOKEN_BLOCK = 4096  # placeholder sequences written per block


@dataclass(frozen=True)
class ToySpec:
    """Which features exist, how often they fire, how jointly, and how strongly.

    The defaults are the reference toy setting: 50 features in 100 dimensions, firing
    probabilities falling linearly from 0.388 (feature 0) to 0.05, 70% of feature pairs asked
    to correlate with strength 0.3-0.9 of random sign (the nearest valid matrix is weaker: median
    |rho| 0.14), magnitudes 1 +- 0.15: true L0 = 10.95.
    """

    n_features: int = 50
    d_model: int = 100
    p_max: float = 0.388  # firing probability of feature 0, falling linearly ...
    p_min: float = 0.05  # ... to this for the last feature
    firing_probabilities: list[float] = field(default_factory=list)  # explicit; overrides p_max/p_min
    correlated_fraction: float = 0.7  # share of feature pairs whose firing is correlated
    correlation_range: list[float] = field(default_factory=lambda: [0.3, 0.9])  # |correlation| asked
    positive_fraction: float = 0.5  # share of correlated pairs that fire together (else avoid)
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.15
    seed: int = 0


def check_toy_spec(values: dict, where: str, errors: list[str]) -> None:
    """Semantic checks for ToySpec (typed_config Rules), each problem with its fix."""
    for key in ("n_features", "d_model"):
        if key in values and values[key] < 1:
            problem(errors, join_key(where, key), f"is {values[key]}", "use a positive count")
    lo, hi = values.get("p_min"), values.get("p_max")
    if lo is not None and hi is not None and not 0 < lo <= hi < 1:
        problem(errors, where, f"p_min {lo} and p_max {hi} are not 0 < p_min <= p_max < 1",
                "give firing probabilities strictly between 0 and 1, p_min the smaller")
    probs = values.get("firing_probabilities") or []
    if probs and "n_features" in values and len(probs) != values["n_features"]:
        problem(errors, join_key(where, "firing_probabilities"), f"has {len(probs)} entries",
                f"give one per feature ({values['n_features']}) or leave it empty")
    if any(not 0 < p < 1 for p in probs):
        problem(errors, join_key(where, "firing_probabilities"), "holds a value outside (0, 1)",
                "firing probabilities are strictly between 0 and 1")
    for key in ("correlated_fraction", "positive_fraction"):
        if key in values and not 0 <= values[key] <= 1:
            problem(errors, join_key(where, key), f"is {values[key]}", "use a fraction in [0, 1]")
    rng = values.get("correlation_range")
    if rng is not None and (len(rng) != 2 or not 0 <= rng[0] <= rng[1] < 1):
        problem(errors, join_key(where, "correlation_range"), f"is {rng}",
                "give [low, high] with 0 <= low <= high < 1")
    if "magnitude_mean" in values and values["magnitude_mean"] <= 0:
        problem(errors, join_key(where, "magnitude_mean"), f"is {values['magnitude_mean']}", "use a positive mean")
    if "magnitude_std" in values and values["magnitude_std"] < 0:
        problem(errors, join_key(where, "magnitude_std"), f"is {values['magnitude_std']}", "use a std >= 0")
    if "seed" in values and values["seed"] < 0:
        problem(errors, join_key(where, "seed"), f"is {values['seed']}", "use a non-negative seed")


def _generator(seed: int, *stream: int) -> torch.Generator:
    """An independent random stream per (seed, stream...): shards never share random numbers."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


def _probabilities(spec: ToySpec) -> Tensor:
    if spec.firing_probabilities:
        return torch.tensor(spec.firing_probabilities, dtype=torch.float64)
    if spec.n_features == 1:
        return torch.tensor([spec.p_max], dtype=torch.float64)
    return torch.linspace(spec.p_max, spec.p_min, spec.n_features, dtype=torch.float64)


def _correlation(spec: ToySpec, gen: torch.Generator) -> Tensor:
    """Random pairwise correlations, then the nearest valid matrix: eigenvalues clipped to a small
    positive floor and the diagonal rescaled to 1 (so strong, dense requests come out weaker)."""
    n = spec.n_features
    iu = torch.triu_indices(n, n, 1)
    m = iu.shape[1]
    chosen = torch.rand(m, generator=gen, dtype=torch.float64) < spec.correlated_fraction
    lo, hi = spec.correlation_range
    strength = lo + (hi - lo) * torch.rand(m, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(m, generator=gen, dtype=torch.float64) < spec.positive_fraction, 1.0, -1.0)
    c = torch.eye(n, dtype=torch.float64)
    c[iu[0], iu[1]] = c[iu[1], iu[0]] = chosen * sign * strength
    lam, v = torch.linalg.eigh(c)
    c = (v * lam.clamp_min(_MIN_EIGENVALUE)) @ v.T
    d = c.diagonal().sqrt()
    c = c / d[:, None] / d[None, :]
    c = (c + c.T) / 2
    c.fill_diagonal_(1.0)
    return c


def _directions(spec: ToySpec, gen: torch.Generator) -> Tensor:
    """[n_features, d_model] unit rows: orthonormal when they fit, random directions otherwise."""
    g = torch.randn(spec.d_model, spec.n_features, generator=gen, dtype=torch.float64)
    if spec.d_model >= spec.n_features:
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(r.diagonal())).T.contiguous()
    return (g / g.norm(dim=0)).T.contiguous()


@dataclass
class ToyGenerator:
    """The ground truth and a sampler of it. Tensors are float64; samples come out float32."""

    spec: ToySpec
    features: Tensor  # [n_features, d_model], unit rows
    probabilities: Tensor  # [n_features]
    correlation: Tensor  # [n_features, n_features], the copula's correlation matrix

    def __post_init__(self) -> None:
        self._mix = torch.linalg.cholesky(self.correlation)
        self._thresholds = torch.special.ndtri(1 - self.probabilities)

    @classmethod
    def from_spec(cls, spec: ToySpec) -> ToyGenerator:
        gen = _generator(spec.seed, 0)
        correlation = _correlation(spec, gen)
        return cls(spec, _directions(spec, gen), _probabilities(spec), correlation)

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def d_model(self) -> int:
        return self.features.shape[1]

    @property
    def true_l0(self) -> float:
        """Expected number of active features per sample."""
        return float(self.probabilities.sum())

    def sample(self, n: int, stream: int) -> tuple[Tensor, Tensor]:
        """(x [n, d_model], codes [n, n_features]), both float32; a pure function of (seed, stream)."""
        gen = _generator(self.spec.seed, 1, stream)
        z = torch.randn(n, self.n_features, generator=gen, dtype=torch.float64) @ self._mix.T
        fires = z > self._thresholds
        eps = torch.randn(n, self.n_features, generator=gen, dtype=torch.float64)
        codes = fires * (self.spec.magnitude_mean + self.spec.magnitude_std * eps).clamp_min(0)
        return (codes @ self.features).float(), codes.float()

    def expected_cofiring(self) -> Tensor:
        """[n, n]: P(feature i and feature j fire in one sample), from the copula (diagonal p_i).

        P(z_i > t_i, z_j > t_j) = int_{t_i}^inf phi(u) Phi((rho u - t_j) / sqrt(1 - rho^2)) du,
        by the trapezoid rule on a fine grid (the tail past t_i + 12 is below 1e-30).
        """
        t = self._thresholds
        u = t[:, None] + torch.linspace(0, 12, 4001, dtype=torch.float64)[None, :]  # [n, grid]
        phi = torch.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi)
        rho = self.correlation.clamp(-1 + 1e-12, 1 - 1e-12)
        out = torch.empty_like(rho)
        for i in range(self.n_features):
            arg = (rho[i, :, None] * u[i, None, :] - t[:, None]) / (1 - rho[i, :, None] ** 2).sqrt()
            out[i] = torch.trapezoid(phi[i] * torch.special.ndtr(arg), u[i], dim=-1)
        out.diagonal().copy_(self.probabilities)
        return out

    def expected_firing_correlation(self) -> Tensor:
        """[n, n]: Pearson correlation of the firing indicators that `sample` should show."""
        p = self.probabilities
        sd = (p * (1 - p)).sqrt()
        return (self.expected_cofiring() - p[:, None] * p[None, :]) / (sd[:, None] * sd[None, :])

    def description(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "spec": dataclasses.asdict(self.spec),
                "true_l0": self.true_l0, "n_features": self.n_features, "d_model": self.d_model}

    def save(self, directory: str | Path) -> Path:
        """The generator as a model directory: weights, a readable description, a tokenizer.

        An unchanged generator is not rewritten, so its identity (a hash of these files) and the
        stored activations keyed by it stay valid across runs.
        """
        d = Path(directory)
        weights = d / GENERATOR_FILE
        text = json.dumps(self.description(), indent=1, sort_keys=True) + "\n"
        if weights.exists() and (d / DESCRIPTION_FILE).exists() and \
                (d / DESCRIPTION_FILE).read_text() == text and (d / "tokenizer.json").exists():
            return d
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features, "probabilities": self.probabilities,
                   "correlation": self.correlation}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights),
                  metadata={"format": FORMAT, "version": str(FORMAT_VERSION),
                            "spec": canonical_json(dataclasses.asdict(self.spec), compact=False)})
        (d / DESCRIPTION_FILE).write_text(text)
        _placeholder_tokenizer().save_pretrained(d)
        return d


def load_generator(directory: str | Path) -> ToyGenerator:
    """The generator saved in a model directory (refuses anything else, saying what it is)."""
    path = Path(directory) / GENERATOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {GENERATOR_FILE}: it is not a synthetic "
                                "generator directory (write one with ToyGenerator.save)")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    if meta.get("format") != FORMAT or int(meta.get("version", 0)) > FORMAT_VERSION:
        raise S.StoreFormatError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; "
                                 f"this mdiff reads {FORMAT} version {FORMAT_VERSION}")
    spec = ToySpec(**json.loads(meta["spec"]))
    return ToyGenerator(spec, tensors["features"], tensors["probabilities"], tensors["correlation"])


def _placeholder_tokenizer():
    """Four tokens (BOS, EOS, PAD, a row token): what the placeholder token set is made of."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mdiff.tiny import BOS, EOS, PAD

    vocab = {BOS: 0, EOS: 1, PAD: 2, ROW_TOKEN: 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=ROW_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=ROW_TOKEN)


@dataclass(frozen=True)
class ToyStoreSpec:
    """How many samples go into the store and how they are laid out (the [tokens]/[cache] knobs)."""

    n_tokens: int = 1 << 19
    context_length: int = 128  # rows per placeholder sequence; train with include_first_position
    validation_fraction: float = 0.0625
    storage_dtype: StorageDtype = "bfloat16"
    chunk_tokens: int = 4096
    shard_tokens: int = 65536
    scale_sample_tokens: int = 65536


def write_toy_config(path: str | Path, generator_dir: str | Path, store: str | Path,
                     layout: ToyStoreSpec, *, name: str = "toy", train: str = "") -> Path:
    """An ordinary experiment config naming the generator directory as its one model.

    `train` is an optional [train] section in TOML, appended as given.
    """
    gen_dir = Path(generator_dir).resolve()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    q = json.dumps  # TOML basic strings and JSON strings agree for paths and names
    path.write_text(f"""name = {q(name)}
store = {q(str(Path(store).resolve()))}

[[models]]
name = "synthetic"
path = {q(str(gen_dir))}
dtype = "float32"

[[hooks]]
layer = 0
site = "resid_post"

[tokens]
context_length = {layout.context_length}
n_tokens = {layout.n_tokens}
validation_fraction = {layout.validation_fraction}
seed = 0

[[tokens.sources]]
kind = "text"
paths = [{q(str(gen_dir / DESCRIPTION_FILE))}]
text_unit = "file"

[cache]
storage_dtype = {q(layout.storage_dtype)}
chunk_tokens = {layout.chunk_tokens}
shard_tokens = {layout.shard_tokens}
scale_sample_tokens = {layout.scale_sample_tokens}
{train}""")
    return path


@dataclass(frozen=True)
class _SyntheticModel:
    """What the cache job's array attributes read from a loaded model."""

    spec: object
    identity: dict
    key: str
    architecture: str = "synthetic"


@dataclass
class SyntheticReport:
    tokenset_id: str
    array_path: str
    scale: float
    shards_written: int
    n_shards: int


def _placeholder_blocks(n_sequences: int, context_length: int, bos: int, row: int):
    for lo in range(0, n_sequences, _TOKEN_BLOCK):
        hi = min(lo + _TOKEN_BLOCK, n_sequences)
        tokens = np.full((hi - lo, context_length), row, np.int32)
        tokens[:, 0] = bos
        yield tokens, np.zeros(hi - lo, np.uint8)


def _estimate_scale(gen: ToyGenerator, arr_layout: dict, ts: S.TokenSet, sample_tokens: int) -> float:
    """The cache job's rule on the generator's rows: mean ||s x|| = sqrt(d_model) over the first
    training sequences, position 0 of each excluded."""
    ctx = ts.context_length
    n_rows = min(ts.n_train_sequences, max(1, math.ceil(sample_tokens / ctx))) * ctx
    shard_rows = arr_layout["shard_rows"]
    parts = []
    for shard in range(-(-n_rows // shard_rows)):
        lo = shard * shard_rows
        parts.append(gen.sample(min(shard_rows, arr_layout["n_rows"] - lo), stream=shard)[0])
    x = torch.cat(parts)[:n_rows]
    keep = torch.arange(n_rows) % ctx != 0
    mean_norm = float(x[keep].norm(dim=-1).double().mean())
    return S.normalization_scale(gen.d_model, mean_norm, lambda m: S.StoreError(
        f"synthetic rows have mean norm {m}; the generator fires nothing"))


def write_store(cfg: ExperimentConfig, log=print, progress: bool = True) -> SyntheticReport:
    """Fill the config's store with the generator's samples; resumable, idempotent."""
    if len(cfg.models) != 1 or len(cfg.hooks) != 1:
        raise ValueError(f"{cfg.source_file}: a synthetic experiment has one model (the generator "
                         f"directory) and one hook, got {len(cfg.models)} and {len(cfg.hooks)}")
    spec, hook = cfg.models[0], cfg.hooks[0]
    gen = load_generator(spec.path)
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=True)
    ref = E.resolve_token_set(cfg)
    if not S.token_set_complete(root, ref.id):
        tok = ref.tokenizer
        blocks = _placeholder_blocks(ref.plan.n_sequences, ref.plan.context_length,
                                     tok.bos_token_id, tok.convert_tokens_to_ids(ROW_TOKEN))
        S.write_token_set(root, ref.id, ref.plan.n_sequences, ref.plan.context_length, blocks,
                          {**token_set_attrs(cfg, ref), "synthetic": gen.description()})
    ts = S.open_token_set(root, ref.id)
    dtype = "float32" if spec.dtype == "auto" else spec.dtype
    identity = M.model_identity(spec, dtype)
    model = _SyntheticModel(spec, identity, M.model_key(identity))
    path = S.activation_path(ts.id, model.key, hook.label)
    layout = {"n_rows": ts.n_sequences * ts.context_length, "d_model": gen.d_model,
              "chunk_rows": cfg.cache.chunk_tokens, "shard_rows": cfg.cache.shard_tokens,
              "storage_dtype": cfg.cache.storage_dtype, "compression": cfg.cache.compression}
    if not S.array_exists(root, path):
        scale = _estimate_scale(gen, layout, ts, cfg.cache.scale_sample_tokens)
        attrs = array_attrs(cfg, model, hook, ts.id, scale)
        S.create_activation_array(root, path, **layout, attrs={**attrs, "synthetic": gen.description()})
    arr = S.open_activation_array(root, path)
    arr.check_structure(layout)
    done = arr.done_shards()
    todo = [s for s in range(arr.n_shards) if s not in done]
    rows = sum(arr.shard_rows_range(s)[1] - arr.shard_rows_range(s)[0] for s in todo)
    if todo:
        log(f"synthetic: writing {len(todo)} of {arr.n_shards} shards ({rows:,} rows, true L0 "
            f"{gen.true_l0:.2f}) to {root.url}/{path}")
    writer = f"{socket.gethostname()}:synthetic"
    with tqdm(total=rows, unit="row", unit_scale=True, desc="synthetic",
              disable=not progress or not todo, dynamic_ncols=True) as bar:
        for shard in todo:
            lo, hi = arr.shard_rows_range(shard)
            x = gen.sample(hi - lo, stream=shard)[0] * arr.scale
            arr.write_shard(shard, S.encode(x, arr.storage_dtype), writer=writer)
            bar.update(hi - lo)
    if not arr.finalize():
        raise S.IncompleteError(f"{root.url}/{path}: shards are missing after writing all of them")
    return SyntheticReport(ts.id, path, arr.scale, len(todo), arr.n_shards)


def build_toy_experiment(directory: str | Path, gen: ToyGenerator, layout: ToyStoreSpec, *,
                         train: str = "", name: str = "toy", log=print, progress: bool = True
                         ) -> tuple[ExperimentConfig, SyntheticReport]:
    """Generator directory, experiment config and filled store under `directory`."""
    d = Path(directory)
    gen.save(d / "generator")
    path = write_toy_config(d / f"{name}.toml", d / "generator", d / "store", layout, name=name,
                            train=train)
    cfg = load_config(path)
    return cfg, write_store(cfg, log=log, progress=progress)
