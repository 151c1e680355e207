"""One way to open a trained dictionary together with what it was trained on.

A dictionary folder (`<train.out_dir>/<name>/`, written by `mdiff train` or by an import) names
the store, token set, hook, activation arrays and normalization scales it was trained with. Every
consumer (splicing, the model-diff analyses, the demo's finding, exports) opens it here, so each
gets the same checks: that the experiment config names that store, those models and that token
set, that the arrays still belong to the token set and hook, and that their scales have not
changed since training (a re-created array with another scale would silently shift every input).

A latent is *dead* in the training sense when it has not fired for `train.dead_after_tokens`
tokens. The trainer leaves each latent's count of tokens since it last fired in
LATENT_ACTIVITY_FILE beside the weights; `dead_mask` reads it. Folders without it (older runs,
imported dictionaries) have no mask: their dead latents are unknown, and nothing here guesses
them from other tokens (latents silent on a few evaluation tokens are another, looser count).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import experiment as E
from pipeline import store as S
from pipeline.config import HookSpec
from pipeline.locations import is_remote, local_path
from trainer.config import TrainExperiment
from trainer.dictionaries import CONFIG_FILE, Dictionary, load_dictionary
from trainer.dictionary import ACTIVITY_FILE

# what `mdiff train` records about the data a dictionary was trained on
REQUIRED_META = ("models", "arrays", "scales", "hook", "tokenset_id", "store")
LATENT_ACTIVITY_FILE = ACTIVITY_FILE  # beside the weights: int64 `tokens_since_fired` [n_latents]


class TrainedDictionaryError(ValueError):
    """The dictionary, the experiment config and the store do not belong together."""


@dataclass
class TrainedDictionary:
    """A dictionary with the token set and arrays it was trained on, all checked to agree."""

    directory: Path
    name: str
    meta: dict  # the folder's config.json
    dictionary: Dictionary
    root: S.StoreRoot
    token_set: S.TokenSet
    arrays: list[S.ActivationArray]  # one per model, in the dictionary's model order
    hook: HookSpec

    @property
    def models(self) -> list[str]:
        return list(self.meta["models"])

    @property
    def scales(self) -> list[float]:
        return [float(s) for s in self.meta["scales"]]

    @property
    def include_first_position(self) -> bool:
        return bool((self.meta.get("train") or {}).get("include_first_position", False))

    @property
    def dead_after_tokens(self) -> int | None:
        """The training run's `dead_after_tokens` (None for folders without a [train] record)."""
        value = (self.meta.get("train") or {}).get("dead_after_tokens")
        return None if value is None else int(value)

    def dead_mask(self) -> torch.Tensor | None:
        """[n_latents] bool: latents silent for at least `dead_after_tokens` training tokens when
        training ended, or None when the folder does not record it (then dead latents are unknown)."""
        return read_dead_mask(self.directory, self.dead_after_tokens, self.dictionary.n_latents)

    @property
    def dead_latents(self) -> int | None:
        """How many latents are dead in the training sense; None when unknown. From the mask, else
        from the count the trainer wrote into config.json."""
        mask = self.dead_mask()
        if mask is not None:
            return int(mask.sum())
        count = self.meta.get("dead_latents") if "train" in self.meta else None
        return None if count is None else int(count)


def read_dead_mask(dict_dir: str | os.PathLike, dead_after_tokens: int | None,
                   n_latents: int) -> torch.Tensor | None:
    """`tokens_since_fired >= dead_after_tokens` from the folder's LATENT_ACTIVITY_FILE; None when
    the file or the threshold is missing. A file of the wrong shape or dtype is an error."""
    path = Path(dict_dir) / LATENT_ACTIVITY_FILE
    if dead_after_tokens is None or not path.is_file():
        return None
    tensors = load_file(str(path))
    since = tensors.get("tokens_since_fired")
    if since is None or since.dtype != torch.int64 or tuple(since.shape) != (n_latents,):
        found = "no tokens_since_fired" if since is None else f"{since.dtype} {tuple(since.shape)}"
        raise TrainedDictionaryError(
            f"{path} holds {found}; expected int64 tokens_since_fired [{n_latents}] (one count per "
            "latent, written by mdiff train): delete the file to treat dead latents as unknown, or "
            "retrain")
    return since >= int(dead_after_tokens)


def read_trained_meta(dict_dir: str | os.PathLike) -> dict:
    """The folder's config.json, refusing folders that do not say what they were trained on."""
    dict_dir = Path(dict_dir)
    path = dict_dir / CONFIG_FILE
    if not path.is_file():
        raise TrainedDictionaryError(
            f"{dict_dir} holds no {CONFIG_FILE}: point at a trained dictionary's folder "
            "(<train.out_dir>/<dictionary name>/), not at a checkpoint")
    meta = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise TrainedDictionaryError(
            f"{path} lacks {missing}: it was not written by `mdiff train` (which records the "
            "store, token set, hook and arrays a dictionary was trained on)")
    return meta


def open_trained(dict_dir: str | os.PathLike, cfg: TrainExperiment, *,
                 device: str | torch.device = "cpu", check_config: bool = True) -> TrainedDictionary:
    """Open the dictionary in `dict_dir` and the arrays it was trained on, in `cfg`'s store.

    `check_config` also requires `cfg` to be the experiment it was trained with (same store,
    models and token set); turn it off only for folders evaluated outside their experiment.
    Folded dictionaries (weights for raw activations, made for export) are refused: everything
    here works on the store's normalized activations.
    """
    dict_dir = Path(dict_dir)
    meta = read_trained_meta(dict_dir)
    name = meta.get("name") or dict_dir.name
    if check_config:
        check_against_config(meta, cfg, dict_dir)
    root = S.StoreRoot(cfg.store, cfg.storage_options)
    root.ensure_format(create=False)
    token_set = S.open_token_set(root, meta["tokenset_id"])
    arrays, hook = _open_arrays(meta, root)
    dictionary = load_dictionary(dict_dir, device=device).eval()
    if dictionary.folded:
        raise TrainedDictionaryError(
            f"{dict_dir} is a folded dictionary (raw inputs); use the unfolded one, which works "
            "on the store's normalized activations")
    return TrainedDictionary(dict_dir, name, meta, dictionary, root, token_set, arrays, hook)


def _same_store(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))


def check_against_config(meta: dict, cfg: TrainExperiment, dict_dir: Path) -> None:
    where = cfg.source_file or cfg.name
    if not _same_store(meta["store"], cfg.store):
        raise TrainedDictionaryError(
            f"dictionary {dict_dir} was trained on the store {meta['store']}, but the config "
            f"{where!r} names the store {cfg.store}: use it with the experiment config it was "
            "trained with")
    missing = [n for n in meta["models"] if n not in {m.name for m in cfg.models}]
    if missing:
        raise TrainedDictionaryError(
            f"dictionary {dict_dir} was trained on models {meta['models']}, but the config "
            f"{where!r} defines no [[models]] named {missing} (it has {[m.name for m in cfg.models]})")
    ts_id = E.resolve_token_set(cfg).id
    if ts_id != meta["tokenset_id"]:
        raise TrainedDictionaryError(
            f"dictionary {dict_dir} was trained on token set {meta['tokenset_id']}, but the config "
            f"{where!r} defines token set {ts_id} (its [tokens] sources, sizes or tokenizer "
            "differ): use it with the experiment config it was trained with")


def _hook_of(arr: S.ActivationArray, label: str) -> HookSpec:
    h = arr.attrs.get("hook") or {}
    hook = HookSpec(int(h["layer"]), h["site"]) if h else None
    if hook is None or hook.label != label:
        raise TrainedDictionaryError(f"{arr.root.url}/{arr.path} holds hook {h.get('label')!r}, but "
                                     f"the dictionary's config.json names {label!r}")
    return hook


def _open_arrays(meta: dict, root: S.StoreRoot) -> tuple[list[S.ActivationArray], HookSpec]:
    arrays = [S.open_activation_array(root, p, require_complete=True) for p in meta["arrays"]]
    if len(arrays) != len(meta["models"]) or len(meta["scales"]) != len(arrays):
        raise TrainedDictionaryError(f"config.json lists {len(meta['models'])} models, {len(arrays)} "
                                     f"arrays and {len(meta['scales'])} scales")
    hooks = {_hook_of(a, meta["hook"]) for a in arrays}
    for arr, scale in zip(arrays, meta["scales"]):
        if arr.attrs.get("tokenset_id") != meta["tokenset_id"]:
            raise TrainedDictionaryError(f"{arr.path} belongs to token set {arr.attrs.get('tokenset_id')}, "
                                         f"not the dictionary's {meta['tokenset_id']}")
        if not math.isclose(arr.scale, float(scale), rel_tol=1e-6):
            raise TrainedDictionaryError(f"{arr.path} has scale {arr.scale}, but the dictionary was "
                                         f"trained with scale {scale}: the array was re-created since "
                                         "training")
    return arrays, hooks.pop()


def _identity_without_dtype(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if k != "dtype"}


def check_model_identity(name: str, live_identity: dict, arr: S.ActivationArray) -> None:
    """A model loaded to run with the dictionary must be the checkpoint its array was cached from.

    An imported array's identity names the foreign cache, not weights: nothing to compare here
    (comparing live with stored activations on the first batch catches other weights).
    """
    cached = arr.attrs.get("model") or {}
    if cached.get("source") != "imported" and \
            _identity_without_dtype(live_identity) != _identity_without_dtype(cached):
        raise TrainedDictionaryError(
            f"model {name!r} of the config ({live_identity}) is not the checkpoint whose "
            f"activations the dictionary was trained on ({cached}, array {arr.path}): "
            "its weights differ; fix the model's repo/revision/path in the config")
