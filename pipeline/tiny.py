"""Tiny, fully offline stand-ins for real checkpoints: a generated corpus, a BPE tokenizer trained on
it, and random-weight models of the supported architectures saved as ordinary Hugging Face
directories.

They exist so that every code path (loading from a directory, hooking, caching, training) can be
exercised in seconds on a CPU with no download, by the tests and by `mdiff smoke`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
    """Corpus + tokenizer + one model per (arch, seed): everything a smoke run needs."""
    d = Path(directory)
    files = make_corpus(d / "corpus", n_docs=n_docs)
    texts = files["text"].read_text().split("\n\n")
    tok = make_tokenizer(texts)
    models = {}
    for arch in archs:
        for seed in seeds:
            name = f"{arch}-s{seed}"
            models[name] = make_model(d / "models" / name, tok, arch, d_model, n_layers, seed)
    return {"corpus": files, "models": models, "tokenizer": tok}


def write_smoke_config(directory: str | Path, fixture: dict, n_tokens: int = 16384,
                       context_length: int = 64) -> Path:
    """An experiment config over the fixture's models: the smallest real run of the pipeline."""
    d = Path(directory)
    models = "\n".join(
        f'[[models]]\nname = "{name}"\npath = "{path.relative_to(d)}"\n'
        for name, path in fixture["models"].items()
    )
    corpus = fixture["corpus"]
    text = f'''# A tiny offline experiment: random-weight models, generated text.
name = "smoke"
store = "store"

{models}
[[hooks]]
layer = 1
site = "resid_post"

[[hooks]]
layer = 2
site = "resid_pre"

[tokens]
context_length = {context_length}
n_tokens = {n_tokens}
validation_fraction = 0.1
seed = 0

[[tokens.sources]]
kind = "text"
paths = ["{corpus['text'].relative_to(d)}"]
weight = 3

[[tokens.sources]]
kind = "jsonl"
paths = ["{corpus['chat'].relative_to(d)}"]
weight = 1

[cache]
storage_dtype = "bfloat16"
chunk_tokens = 1024
shard_tokens = 4096
batch_size = 16
scale_sample_tokens = 4096
'''
    path = d / "experiment.toml"
    path.write_text(text)
    return path
