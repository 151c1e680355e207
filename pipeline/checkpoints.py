"""Where a checkpoint's files come from, and the one error every failure to reach them becomes.

A model is named by exactly one source: a hub repo at a revision, a local Hugging Face directory,
or a GGUF file. Hub revisions are pinned to the commit they resolve to, so that the config, the
weights and the tokenizer all come from one snapshot, the one the model's identity names, and a
moving branch cannot change them under a cached key. Every failure inside huggingface_hub or
transformers is turned into a `ModelLoadError` that names the model, its source, and the fix
(a revision missing from the offline cache lists the cached ones).

Loading the weights (`pipeline.models`), naming them (`pipeline.identity`) and loading the
tokenizer (`pipeline.tokenizer`) all locate their files here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.config import ModelSpec

_COMMIT_RE = re.compile(r"snapshots/([0-9a-f]{40})(?:/|$)")


class ModelLoadError(RuntimeError):
    """A checkpoint (or its config/tokenizer) could not be loaded; the message says how to fix it."""


def offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import, so setting it later is ignored."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_cache_dir(cache_dir: str | os.PathLike | None) -> str | None:
    """Like `offline`, honour HF_HUB_CACHE / HF_HOME as they are now, not as they were at import."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def source_kind(spec: ModelSpec) -> str:
    """'repo', 'path' or 'gguf': the one source the spec names."""
    given = [k for k in ("repo", "path", "gguf") if getattr(spec, k)]
    if len(given) != 1:
        raise ValueError(
            f"model {spec.name!r}: set exactly one of repo, path, gguf (got {given or 'none'})"
        )
    if spec.revision and given[0] != "repo":
        raise ValueError(f"model {spec.name!r}: revision is only meaningful with repo, not {given[0]}")
    return given[0]


def where(spec: ModelSpec) -> str:
    """The source, as messages name it."""
    if spec.repo:
        return f"repo {spec.repo!r} revision {spec.revision or 'main'!r}"
    return f"path {spec.path!r}" if spec.path else f"GGUF file {spec.gguf!r}"


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text[:limit] + "..." if len(text) > limit else text.rstrip(".")
    return f"{type(exc).__name__}: {text}"


def _cache_root(cache_dir: str | None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def _cached_revisions(repo: str, cache_dir: str | None) -> list[str] | None:
    """Revisions this repo has in the local hub cache; None when the repo is not cached at all."""
    repo_dir = _cache_root(cache_dir) / f"models--{repo.replace('/', '--')}"
    if not repo_dir.is_dir():
        return None
    refs = repo_dir / "refs"
    return sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []


def _hub_hint(spec: ModelSpec, exc: BaseException, cache_dir: str | None) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = spec.revision or "main"
    download = f"download it first (`hf download {spec.repo} --revision {revision}`) or set HF_HUB_OFFLINE=0"
    if isinstance(exc, RevisionNotFoundError):
        return "check the revision name; Pythia revisions look like step143000"
    if isinstance(exc, GatedRepoError):
        return "accept the model's licence on huggingface.co and log in with `hf auth login`"
    if isinstance(exc, RepositoryNotFoundError):
        return "check the repo id (owner/name); private repos need `hf auth login`"
    if isinstance(exc, LocalEntryNotFoundError) or offline():
        cached = _cached_revisions(spec.repo, cache_dir)
        if cached is None:
            return f"{spec.repo} is not in the local hub cache ({_cache_root(cache_dir)}); {download}"
        if revision not in cached:
            return (f"revision {revision!r} is not in the local cache of {spec.repo} (cached: "
                    f"{', '.join(cached) or 'none'}); check the revision name (Pythia revisions look "
                    f"like step143000), or {download}")
        return f"the cached snapshot of {spec.repo}@{revision} is incomplete; {download}"
    return "check the repo id and revision, and your network connection"


def _fix_hint(spec: ModelSpec, exc: BaseException, cache_dir: str | None) -> str:
    if spec.repo:
        return _hub_hint(spec, exc, cache_dir)
    target = spec.path or spec.gguf
    if not Path(target).exists():
        return f"check the path: {target} does not exist"
    if spec.path:
        return "`path` must be a Hugging Face model directory (config.json plus *.safetensors or *.bin)"
    return "`gguf` must be a complete GGUF file of an architecture transformers can dequantize"


def load_error(spec: ModelSpec, what: str, exc: BaseException,
               cache_dir: str | None = None) -> ModelLoadError:
    """`exc`, met while loading the `what` (config, weights, tokenizer...) of `spec`, as one error
    that names the model and its source and says how to fix it."""
    return ModelLoadError(
        f"could not load the {what} of model {spec.name!r} from {where(spec)}: {_one_line(exc)}. "
        f"Fix: {_fix_hint(spec, exc, cache_dir)}"
    )


def resolve_commit(spec: ModelSpec, cache_dir: str | None) -> str:
    """The commit a hub revision points to now; offline, the one the local cache recorded for it."""
    from huggingface_hub import hf_hub_download

    try:
        config_file = hf_hub_download(spec.repo, "config.json", revision=spec.revision or "main",
                                      cache_dir=cache_dir, local_files_only=offline())
    except Exception as e:  # noqa: BLE001 - every cause becomes one clear ModelLoadError
        raise load_error(spec, "config", e, cache_dir) from e
    match = _COMMIT_RE.search(Path(config_file).as_posix())
    if match is None:
        raise ModelLoadError(
            f"model {spec.name!r}: {where(spec)} resolved to {config_file}, which is not inside a "
            "hub cache snapshot, so its commit is unknown. Fix: use `path` for local directories"
        )
    return match.group(1)


def locate(spec: ModelSpec, cache_dir: str | None) -> tuple[str, dict, str | None]:
    """(name_or_path, from_pretrained kwargs, commit) for this source.

    Hub sources are pinned to the commit their revision resolves to, so that the config, the weights
    and the tokenizer come from one snapshot, the one the identity names.
    """
    kind = source_kind(spec)
    if kind == "repo":
        commit = resolve_commit(spec, cache_dir)
        return spec.repo, dict(revision=commit, cache_dir=cache_dir, local_files_only=offline()), commit
    target = Path(spec.path or spec.gguf)
    if not target.exists():
        raise load_error(spec, "files", FileNotFoundError(f"no such {kind}: {target}"))
    if kind == "path":
        return str(target), {}, None
    return str(target.parent), dict(gguf_file=target.name), None


def from_pretrained(spec: ModelSpec, what: str, loader, name_or_path: str, kwargs: dict,
                    cache_dir: str | None):
    """`loader.from_pretrained(...)`; every failure inside transformers becomes one ModelLoadError
    that says what to do."""
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise load_error(spec, what, e, cache_dir) from e
