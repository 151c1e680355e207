"""Helpers several test packages share (public names only)."""

from __future__ import annotations


def leaf_paths(data: object, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested config a mutation can hit, containers included."""
    out = [prefix] if prefix else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out += leaf_paths(v, prefix + (k,))
    return out


def cache_tiny_store(d, *, seeds=(0, 1), n_docs: int = 600, n_layers: int = 3, n_tokens: int = 8192):
    """(d, fixture): tiny llama models (d_model 32) cached at layer 1 resid_post into d/store, the
    store the trainer tests train from (built once per module: training only reads it)."""
    from mdiff.config import load_config
    from mdiff.tiny import build_fixture, write_config
    from pipeline.cache import run_cache

    fx = build_fixture(d, archs=("llama",), seeds=seeds, n_docs=n_docs, d_model=32, n_layers=n_layers)
    cfg = write_config(d / "cache.toml", fx, n_tokens=n_tokens, hooks=((1, "resid_post"),), store=str(d / "store"))
    run_cache(load_config(cfg), log=lambda *a: None, progress=False)
    return d, fx


def interrupt_training_at(monkeypatch, step: int, error: type[BaseException] = KeyboardInterrupt):
    """Make the trainer raise `error` (by default as Ctrl-C would) when it reaches `step` (0-based),
    before any dictionary takes that step; returns the real train_step, to put back."""
    from trainer import train as T

    real = T.train_step

    def dying(m, x, at, *rest, **kwargs):
        if at == step:
            raise error
        return real(m, x, at, *rest, **kwargs)

    monkeypatch.setattr(T, "train_step", dying)
    return real
