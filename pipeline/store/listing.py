"""What a store holds: its token sets, its arrays, and the model keys cached on a token set.

`mdiff status`, `mdiff verify` and the search for imported arrays walk the store; the walk follows
the layout, so it lives beside it rather than in each command.
"""

from __future__ import annotations

from pipeline.store import layout
from pipeline.store.root import StoreRoot


def list_token_sets(root: StoreRoot) -> list[str]:
    return [n for n in root.list_names(layout.TOKEN_SETS, folders=True) if n.startswith("ts-")]


def list_model_keys(root: StoreRoot, tokenset_id: str) -> list[str]:
    """The model keys that have arrays (complete or not) on this token set, sorted."""
    return root.list_names(layout.token_set_arrays_path(tokenset_id), folders=True)


def list_activation_arrays(root: StoreRoot) -> list[str]:
    paths = []
    for ts in root.list_names(layout.ACTIVATIONS, folders=True):
        for model in list_model_keys(root, ts):
            model_path = f"{layout.token_set_arrays_path(ts)}/{model}"
            for hook in root.list_names(model_path, folders=True):
                if root.exists(layout.array_metadata(f"{model_path}/{hook}")):
                    paths.append(layout.activation_path(ts, model, hook))
    return paths
