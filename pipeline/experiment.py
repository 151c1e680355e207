"""Which stored arrays an experiment means, found without running a model.

The cache job, the trainer and the evaluations all need the same answer: the token set id
(hash of the sources and the tokenizer) and, per model and hook, the array keyed by the model's
identity. Computing it here once keeps the three stages from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import models as M
from . import store as S
from . import tokens as T
from .config import ExperimentConfig, HookSpec, ModelSpec


@dataclass
class TokenSetRef:
    id: str
    plan: T.TokenSetPlan
    fingerprint: str
    tokenizer: object
    tokenizer_from: str


def resolve_token_set(cfg: ExperimentConfig) -> TokenSetRef:
    """Load every model's tokenizer, insist they agree, and hash the token set's definition."""
    tok_name = cfg.tokens.tokenizer or cfg.models[0].name
    tokenizers = [(m.name, M.load_tokenizer(m)) for m in cfg.models]
    M.check_same_tokenizer(tokenizers)
    tokenizer = dict(tokenizers)[tok_name]
    fingerprint = M.tokenizer_fingerprint(tokenizer)
    plan = T.plan_token_set(cfg.tokens)  # hashes the source files once
    ts_id = T.token_set_id(cfg.tokens, fingerprint, plan.source_descriptions)
    return TokenSetRef(ts_id, plan, fingerprint, tokenizer, tok_name)


def hook_by_label(cfg: ExperimentConfig, label: str | None) -> HookSpec:
    if label is None:
        return cfg.hooks[0]
    for h in cfg.hooks:
        if h.label == label:
            return h
    raise KeyError(label)


def find_array(root: S.StoreRoot, ts_id: str, spec: ModelSpec, hook: HookSpec,
               config_file: str | None = None) -> S.ActivationArray:
    """The complete array of this model and hook.

    With `dtype = "auto"` the compute dtype depends on the machine (bfloat16 on a GPU, float32 on
    a CPU), so a cache made on a GPU box must still be found from a CPU box: both are tried, the
    one this machine would compute first.
    """
    if spec.dtype == "auto":
        here = str(M.resolve_dtype("auto", M.resolve_device(spec.device))).removeprefix("torch.")
        dtypes = [here] + [d for d in ("bfloat16", "float32") if d != here]
    else:
        dtypes = [spec.dtype]
    tried = []
    for dtype in dtypes:
        key = M.model_key(M.model_identity(spec, dtype))
        path = S.activation_path(ts_id, key, hook.label)
        if root.exists(f"{path}/_complete.json"):
            return S.open_activation_array(root, path, require_complete=True)
        tried.append(path)
        if root.exists(f"{path}/zarr.json"):
            S.open_activation_array(root, path).require_complete()  # raises with the progress
    raise S.IncompleteError(
        f"model {spec.name!r} at {hook.label} is not cached in {root.url} (looked for "
        f"{' and '.join(tried)}); run: mdiff cache {config_file or '<experiment config>'}"
    )
