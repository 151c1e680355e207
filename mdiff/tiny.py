"""Tiny, fully offline stand-ins for real checkpoints: a generated corpus, a BPE tokenizer trained on
it, and random-weight models of the supported architectures saved as ordinary Hugging Face
directories.

They exist so that every code path (loading from a directory, hooking, caching, training) can be
exercised in seconds on a CPU with no download, by the tests and by `mdiff smoke`.
"""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path

from pipeline.config_files import write_config as write_experiment

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a of and to in is was he she it they we you that for on with as his her at by from this "
    "light water river stone king queen house field bread wine night morning city road tree star "
    "said went came saw made gave took found heard spoke walked built carried opened wrote "
    "great small old new long dark bright quiet early late first last many few every other"
).split()


def make_corpus(directory: str | Path, n_docs: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write deterministic pseudo-prose and chat transcripts; returns the files by kind."""
    rng = random.Random(seed)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def sentence() -> str:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        return " ".join(words).capitalize() + rng.choice([".", ".", "!", "?"])

    paragraphs = [" ".join(sentence() for _ in range(rng.randint(2, 6))) for _ in range(n_docs)]
    prose = d / "prose.txt"
    prose.write_text("\n\n".join(paragraphs) + "\n")
    with (d / "prose.jsonl").open("w") as f:
        for p in paragraphs:
            f.write(json.dumps({"text": p}) + "\n")
    chats = d / "chats.jsonl"
    with chats.open("w") as f:
        for _ in range(n_docs // 2):
            turns = [
                {"role": role, "content": sentence()}
                for _, role in zip(range(rng.randint(1, 3) * 2), ["user", "assistant"] * 3)
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return {"text": prose, "jsonl": d / "prose.jsonl", "chat": chats}


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer with BOS/EOS/PAD and a chat template, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


ARCHITECTURES = ("gpt_neox", "llama", "olmo", "bloom", "gemma", "gemma2")


def model_config(arch: str, vocab_size: int, d_model: int = 64, n_layers: int = 4, seed: int = 0):
    """A small config of architecture `arch`; `seed` only varies nothing structural."""
    import transformers as T

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    heads = 4
    if arch == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers,
                               num_attention_heads=heads, intermediate_size=4 * d_model,
                               max_position_embeddings=2048, **common)
    if arch == "bloom":
        return T.BloomConfig(hidden_size=d_model, n_layer=n_layers, n_head=heads, **common)
    cls = {"llama": T.LlamaConfig, "olmo": T.OlmoConfig, "gemma": T.GemmaConfig,
           "gemma2": T.Gemma2Config}[arch]
    extra = {"head_dim": d_model // heads} if arch.startswith("gemma") else {}
    return cls(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=heads,
               num_key_value_heads=2, intermediate_size=2 * d_model,
               max_position_embeddings=2048, **extra, **common)


def make_model(directory: str | Path, tokenizer, arch: str = "llama", d_model: int = 64,
               n_layers: int = 4, seed: int = 0) -> Path:
    """Save a random-weight causal LM (and the tokenizer) to `directory`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM

    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1, "use make_tokenizer()"
    torch.manual_seed(seed)
    cfg = model_config(arch, len(tokenizer), d_model, n_layers)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    d = Path(directory)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def build_fixture(directory: str | Path, archs=("llama",), n_docs: int = 200, seeds=(0,),
                  d_model: int = 64, n_layers: int = 4) -> dict:
    """Corpus + tokenizer + one model per (arch, seed): everything a smoke run needs.
    Paths come back absolute, so configs that name them work from any directory."""
    d = Path(directory).resolve()
    files = make_corpus(d / "corpus", n_docs=n_docs)
    texts = files["text"].read_text().split("\n\n")
    tok = make_tokenizer(texts)
    models = {}
    for arch in archs:
        for seed in seeds:
            name = f"{arch}-s{seed}"
            models[name] = make_model(d / "models" / name, tok, arch, d_model, n_layers, seed)
    return {"corpus": files, "models": models, "tokenizer": tok}


def write_config(path: str | Path, fixture: dict, *, models=None, store: str = "store",
                 n_tokens: int = 1024, context_length: int = 16,
                 hooks=((1, "resid_post"), (2, "resid_pre")), storage_dtype: str = "bfloat16",
                 chunk_tokens: int = 64, shard_tokens: int = 256, batch_size: int = 8,
                 scale_sample_tokens: int = 256, extra_models=(), name: str = "exp",
                 storage_options: dict | None = None, train=None) -> Path:
    """An experiment config over the fixture's models and corpus (3:1 prose and chats).

    Paths are written absolute, so the file can live anywhere. `extra_models` are more [[models]]
    tables; `train` holds the sections after [cache], e.g. `train_section(...)` or
    `smoke_sections()`: {"train": {...}, "eval": {...}}. Either may also be given as TOML text.
    """
    names = list(models or fixture["models"])
    more = _toml_data(extra_models).get("models", []) if isinstance(extra_models, str) else list(extra_models)
    corpus = fixture["corpus"]
    config = {
        "name": name, "store": str(store), "storage_options": storage_options,
        "models": [{"name": m, "path": str(fixture["models"][m])} for m in names] + more,
        "hooks": [{"layer": layer, "site": site} for layer, site in hooks],
        "tokens": {"context_length": context_length, "n_tokens": n_tokens, "validation_fraction": 0.125,
                   "seed": 3, "sources": [{"kind": "text", "paths": [str(corpus["text"])], "weight": 3},
                                          {"kind": "jsonl", "paths": [str(corpus["chat"])], "weight": 1}]},
        "cache": {"storage_dtype": storage_dtype, "chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens,
                  "batch_size": batch_size, "scale_sample_tokens": scale_sample_tokens},
        **_toml_data(train),
    }
    return write_experiment(path, config)


def train_section(models: list[str], dictionaries: list, *, steps: int = 60, lr: float = 1e-3,
                  batch_size: int = 256, checkpoint_every: int = 20, eval_every: int = 30,
                  eval_batches: int = 2, read_threads: int = 2, extra=None) -> dict:
    """A small [train] section for tiny experiments, as write_config's `train`: {"train": {...}}.

    `dictionaries` are the [[train.dictionaries]] entries (mappings, or TOML text of one entry's
    keys); `extra` holds more [train] keys (a mapping, or TOML text).
    """
    entries = [_toml_data(d) for d in dictionaries]
    return {"train": {"hook": "layer1.resid_post", "models": list(models), "batch_size": batch_size,
                      "steps": steps, "lr": lr, "lr_warmup_steps": 5, "log_every": 10, "eval_every": eval_every,
                      "eval_batches": eval_batches, "checkpoint_every": checkpoint_every, "buffer_tokens": 1024,
                      "read_threads": read_threads, "dead_after_tokens": 2048, **_toml_data(extra),
                      "dictionaries": entries}}


def smoke_sections(**train) -> dict:
    """The smoke run's [train] (a crosscoder sweep of two) and [eval] sections; keyword arguments
    replace [train] keys."""
    return {
        "train": {"out_dir": "train", "hook": "layer1.resid_post", "batch_size": 512, "steps": 200, "lr": 1e-3,
                  "lr_warmup_steps": 20, "log_every": 20, "eval_every": 100, "checkpoint_every": 100,
                  "buffer_tokens": 4096, **train,
                  "dictionaries": [
                      {"name": "batchtopk-k8", "architecture": "batchtopk", "n_latents": 512, "k": 8},
                      {"name": "relu-l1", "architecture": "relu", "n_latents": 512, "l1_coefficient": 0.3,
                       "l1_warmup_steps": 50}]},
        "eval": {"n_sequences": 32, "batch_size": 8, "top_latents": 10, "contexts_per_latent": 4,
                 "token_classes": [{"name": "chat-markers", "kind": "special"}]},
    }


def write_smoke_config(directory: str | Path, fixture: dict) -> Path:
    """The smallest real run of the whole pipeline: two tiny models, a crosscoder sweep of two."""
    d = Path(directory).resolve()
    return write_config(d / "experiment.toml", fixture, store=str(d / "store"), n_tokens=32768,
                        context_length=64, chunk_tokens=1024, shard_tokens=4096, batch_size=16,
                        scale_sample_tokens=4096, name="smoke", train=smoke_sections())


def _toml_data(value) -> dict:
    """A mapping as a dict; TOML text (the form older callers pass) parsed into one; None or "" as {}."""
    if isinstance(value, str):
        return tomllib.loads(value)
    return dict(value or {})
