"""Stage one's sections of the experiment file: models, hooks, tokens, cache, and where the store is.

Typed frozen dataclasses are the single source of truth for every knob. The trainer and the
evaluations extend `CacheExperiment` with their own sections (`trainer.config`, `evals.config`);
the app composes the whole file (`mdiff.config`). The checks are in `pipeline.input_checks`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

Site = Literal["resid_pre", "resid_post"]


ComputeDtype = Literal["auto", "float32", "bfloat16"]


StorageDtype = Literal["bfloat16", "float32"]


SourceKind = Literal["hf", "text", "jsonl", "parquet", "tokenized"]


# What ends each document in a source's stream: "eos" (the tokenizer's EOS), "none", or one token.
DEFAULT_SEPARATOR = "eos"
NO_SEPARATOR = "none"
# End-of-turn tokens of chat templates (Llama 3, ChatML, Gemma, Phi-3, Llama 4): a base model was not
# trained to read them between documents (Llama 3's base model never trained <|eot_id|>'s embedding).
CHAT_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|eot|>")
_CHAT_MODEL = re.compile(r"instruct|chat|(^|[-_.])(it|sft|dpo|rlhf)($|[-_.])", re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint. At most one of `repo`, `path`, `gguf` names where its weights come from;
    `imported` trains on activations `mdiff import-cache` wrote instead of cached ones, and needs
    the weights only for splicing (stage three runs the model)."""

    name: str
    repo: str | None = None  # Hugging Face repo id, e.g. "EleutherAI/pythia-1b"
    revision: str | None = None  # branch, tag or commit, e.g. "step512"; only with `repo`
    path: str | None = None  # local Hugging Face directory (config.json + weights)
    gguf: str | None = None  # local GGUF file; dequantized to dense weights on load
    dtype: ComputeDtype = "auto"  # compute dtype; auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto = this process's GPU if any
    imported: str | None = None  # the --model name given to mdiff import-cache; needs tokens.tokenset

    @property
    def has_weights(self) -> bool:
        return any(v is not None for v in (self.repo, self.path, self.gguf))

    @property
    def is_chat_model(self) -> bool:
        """Whether the weights' name marks a chat model (...-Instruct, ...-it, ...-chat). The config
        alone cannot tell more, so a model without such a mark is taken for a base model."""
        weights = self.repo or self.path or self.gguf or ""
        return bool(_CHAT_MODEL.search(os.path.basename(weights.rstrip("/")).removesuffix(".gguf")))


@dataclass(frozen=True)
class HookSpec:
    layer: int
    site: Site = "resid_post"

    @property
    def label(self) -> str:
        return f"layer{self.layer}.{self.site}"


@dataclass(frozen=True)
class SourceSpec:
    """One token source; several are mixed in proportion to `weight`."""

    kind: SourceKind
    name: str | None = None  # hf: dataset name or local dataset directory
    config: str | None = None  # hf: dataset config (subset)
    split: str = "train"  # hf / tokenized (saved dataset dict)
    revision: str | None = None  # hf: dataset revision
    paths: list[str] = field(default_factory=list)  # text / jsonl / parquet / tokenized: files or globs
    column: str | None = None  # default "text" (or "messages" for chats, "input_ids" for tokenized)
    weight: float = 1.0
    chat: Literal["auto", "yes", "no"] = "auto"  # render conversation records with the chat template
    text_unit: Literal["line", "paragraph", "file"] = "paragraph"  # text: what one document is
    # the token after each document, as the model reading it was trained: "eos" (the tokenizer's EOS),
    # "none" (a chat template that ends each conversation itself) or one token, e.g. "<|end_of_text|>"
    separator: str = DEFAULT_SEPARATOR

    @property
    def reads_plain_text(self) -> bool:
        """Whether the documents are plain text, as far as the config says: not token ids, and not
        conversations (chat = "yes", or the "messages" column) that a chat template renders."""
        return self.kind != "tokenized" and self.chat != "yes" and self.column != "messages"


@dataclass(frozen=True)
class TokenSpec:
    sources: list[SourceSpec] = field(default_factory=list)
    context_length: int = 1024
    n_tokens: int = 1_000_000
    validation_fraction: float = 0.05
    seed: int = 0
    tokenizer: str | None = None  # name of the model whose tokenizer is used; default: the first with weights
    # a token set already in the store ("ts-" + 16 hex, e.g. the one mdiff import-cache printed)
    # instead of one built from sources; its sizes and split are the token set's own
    tokenset: str | None = None


@dataclass(frozen=True)
class CacheSpec:
    storage_dtype: StorageDtype = "bfloat16"
    chunk_tokens: int = 4096  # rows per chunk: the unit the loader reads
    shard_tokens: int = 65536  # rows per shard file: the unit the job writes and records
    compression: Literal["none", "zstd"] = "none"
    batch_size: int = 8  # sequences per forward pass
    scale_sample_tokens: int = 65536  # tokens used to estimate each normalization scale


@dataclass(frozen=True)
class CacheExperiment:
    """What stage one reads of the experiment file; later stages extend it with their sections."""

    name: str
    store: str  # local directory or any fsspec URL (s3://bucket/prefix, memory://x, ...)
    models: list[ModelSpec]
    hooks: list[HookSpec]
    tokens: TokenSpec
    cache: CacheSpec = field(default_factory=CacheSpec)
    storage_options: dict = field(default_factory=dict)  # passed to fsspec for remote stores
    # set by the loader: where this config came from; never read from the file itself
    source_file: str | None = field(default=None, metadata={"loader_only": True})

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)
