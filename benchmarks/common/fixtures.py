"""Random-weight models of real shapes, built offline, for the stage benchmarks (bench_cache,
bench_eval): throughput does not depend on the weights' values."""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
}


def build_model_dir(d: Path, tokenizer, shape: str) -> Path:
    """A Hugging Face folder under `d`: a Llama of this shape (seed 0) and the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    sizes = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(**sizes, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    path = d / f"bench-{shape}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
