"""Which stored arrays an experiment means, found without running a model.

The cache job, the trainer and the evaluations all need the same answer: the token set id
(hash of the sources and the tokenizer, or the id `tokens.tokenset` names) and, per model and
hook, the array keyed by the model's identity (or, for `imported = NAME`, the array
`mdiff import-cache` wrote under that name). Computing it here once keeps the three stages from
drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import CacheExperiment as ExperimentConfig
from pipeline.config import HookSpec, ModelSpec
from pipeline.typed_config import ConfigError

from . import models as M
from . import store as S
from . import tokens as T


@dataclass
class TokenSetRef:
    id: str
    # the rest is None for a token set named by tokens.tokenset: nothing to build
    plan: T.TokenSetPlan | None
    fingerprint: str | None
    tokenizer: object
    tokenizer_from: str | None


def experiment_tokenizer(cfg: ExperimentConfig, log=None) -> tuple[object, str | None]:
    """(tokenizer, model name): tokens.tokenizer's model's, default the first model's with weights,
    after insisting that every model with weights has the same vocabulary (differences in special
    tokens or chat template go to `log`). (None, None) without weights."""
    weighted = [m for m in cfg.models if m.has_weights]
    if not weighted:
        return None, None
    tok_name = cfg.tokens.tokenizer or weighted[0].name
    tokenizers = [(m.name, M.load_tokenizer(m)) for m in weighted]
    for note in M.check_same_tokenizer(tokenizers):
        if log is not None:
            log(f"{note}; here: {tok_name!r}'s")
    return dict(tokenizers)[tok_name], tok_name


def resolve_token_set(cfg: ExperimentConfig, log=None) -> TokenSetRef:
    """Load every model's tokenizer, insist they agree, and hash the token set's definition.

    A token set named by `tokens.tokenset` is taken as it is: nothing to tokenize or hash.
    """
    if cfg.tokens.tokenset is not None:
        return TokenSetRef(cfg.tokens.tokenset, None, None, None, None)
    tokenizer, tok_name = experiment_tokenizer(cfg, log)
    fingerprint = M.tokenizer_fingerprint(tokenizer)
    plan = T.plan_token_set(cfg.tokens)  # hashes the source files once
    ts_id = T.token_set_id(cfg.tokens, fingerprint, plan.source_descriptions)
    return TokenSetRef(ts_id, plan, fingerprint, tokenizer, tok_name)


def require_sources(cfg: ExperimentConfig, command: str) -> None:
    """Commands that build token sets or run every model refuse a config that names a finished
    token set: the token set and its (imported) arrays are already there."""
    if cfg.tokens.tokenset is not None:
        raise ConfigError(cfg.source_file or "<config>", [(
            f"tokens.tokenset: {command} builds a token set from [[tokens.sources]] and caches every "
            f"model's activations on it, but this config names the finished token set "
            f"{cfg.tokens.tokenset} (train on it with: mdiff train {cfg.source_file or '<config>'}; "
            "to cache models, write a config with [[tokens.sources]] instead of tokens.tokenset)")])


def open_token_set(root: S.StoreRoot, cfg: ExperimentConfig, ts_id: str) -> S.TokenSet:
    """The experiment's token set; one named by tokens.tokenset must already be in the store."""
    if cfg.tokens.tokenset is not None and not S.token_set_complete(root, ts_id):
        have = ", ".join(S.list_token_sets(root)) or "none"
        raise ConfigError(cfg.source_file or "<config>", [(
            f"tokens.tokenset: {ts_id} is not a complete token set of the store {root.url} (it holds: "
            f"{have}; use the id mdiff import-cache printed, or check the config's store)")])
    return S.open_token_set(root, ts_id)


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
    if spec.imported is not None:
        return _find_imported(root, ts_id, spec, hook)
    if spec.dtype == "auto":
        here = str(M.resolve_dtype("auto", M.resolve_device(spec.device))).removeprefix("torch.")
        dtypes = [here] + [d for d in ("bfloat16", "float32") if d != here]
    else:
        dtypes = [spec.dtype]
    tried = []
    for dtype in dtypes:
        key = M.model_key(M.model_identity(spec, dtype))
        path = S.activation_path(ts_id, key, hook.label)
        if S.array_complete(root, path):
            return S.open_activation_array(root, path, require_complete=True)
        tried.append(path)
        if S.array_exists(root, path):
            S.open_activation_array(root, path).require_complete()  # raises with the progress
    imported = imported_arrays(root, ts_id, hook)
    fix = (f"to train on an imported one instead, add imported = '<name>' to model {spec.name!r}'s "
           f"[[models]] entry (imported here at {hook.label}: {', '.join(map(repr, sorted(imported)))})"
           if imported else f"run: mdiff cache {config_file or '<experiment config>'}")
    raise S.IncompleteError(
        f"model {spec.name!r} at {hook.label} is not cached in {root.url} (looked for "
        f"{' and '.join(tried)}); {fix}"
    )


def imported_arrays(root: S.StoreRoot, ts_id: str, hook: HookSpec) -> dict[str, list[str]]:
    """Paths of the arrays `mdiff import-cache` wrote into this token set at this hook, by the
    name given at import (storage_layout.md: their model identity has source "imported")."""
    found: dict[str, list[str]] = {}
    for key in S.list_model_keys(root, ts_id):
        path = S.activation_path(ts_id, key, hook.label)
        identity = S.array_attributes(root, path).get("model") or {}
        if identity.get("source") == "imported":
            found.setdefault(str(identity.get("name")), []).append(path)
    return found


def _find_imported(root: S.StoreRoot, ts_id: str, spec: ModelSpec, hook: HookSpec) -> S.ActivationArray:
    found = imported_arrays(root, ts_id, hook)
    paths = found.get(spec.imported, [])
    if len(paths) == 1:
        return S.open_activation_array(root, paths[0], require_complete=True)
    if paths:
        raise S.StoreMismatchError(
            f"model {spec.name!r}: {len(paths)} caches were imported as {spec.imported!r} into token set "
            f"{ts_id} at {hook.label} ({', '.join(paths)}); import one again under another --model "
            "name and set imported to that name")
    there = ", ".join(map(repr, sorted(found))) or "none"
    raise S.IncompleteError(
        f"model {spec.name!r}: no array imported as {spec.imported!r} at {hook.label} in token set "
        f"{ts_id} of {root.url} (imported there at {hook.label}: {there}); set imported to the --model "
        f"name given to mdiff import-cache and check [[hooks]], or import it: mdiff import-cache SOURCE "
        f"--store {root.url} --model {spec.imported} --hook {hook.label} --tokenset {ts_id}")
