"""The configs users copy from must stay valid: every file in configs/ and the README's example."""

import re
from pathlib import Path

import pytest

from mdiff.config import load_config, parse_config
from pipeline.config import CHAT_TURN_TOKENS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.models and cfg.hooks and cfg.train is not None


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_plain_text_read_by_a_base_model_ends_documents_as_the_base_model_does(path):
    """Loading applies the separator rule; beyond it, where a chat model's tokenizer builds the tokens
    that a Hub base checkpoint reads, its EOS (often the end of a chat turn, as Llama 3.1 Instruct's
    <|eot_id|>) must not end plain-text documents by default: each such source names its separator.
    (A local directory's name says nothing: the demo's fine-tune of an Instruct model is no base.)"""
    cfg = load_config(path)
    base = [m for m in cfg.models if m.repo is not None and not m.is_chat_model]
    tokenizer = cfg.model(cfg.tokens.tokenizer or cfg.models[0].name)
    for i, src in enumerate(cfg.tokens.sources):
        if base and src.reads_plain_text:
            assert src.separator not in CHAT_TURN_TOKENS, f"tokens.sources[{i}]"
            if tokenizer.is_chat_model:
                assert src.separator != "eos", f"tokens.sources[{i}] ends documents with {tokenizer.name}'s EOS"


def test_readme_example_is_a_valid_config():
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    experiment = next(b for b in blocks if b.lstrip().startswith("name ="))
    train = next(b for b in blocks if b.lstrip().startswith("[train]"))
    cfg = parse_config(tomllib.loads(experiment + "\n" + train), "README.md", base_dir=str(REPO))
    assert [m.name for m in cfg.models] == ["1B", "4B"]
    assert [d.architecture for d in cfg.train.dictionaries] == ["batchtopk", "relu"]
