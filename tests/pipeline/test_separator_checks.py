"""The config rule on document separators: plain text that a base model reads must not be separated
by a chat template's end-of-turn token; conversations, chat-only experiments and the base model's
own end-of-text token pass. Purely on the config: nothing is downloaded."""

from __future__ import annotations

import copy

import pytest

from mdiff.config import parse_config
from pipeline.config import CHAT_TURN_TOKENS, ModelSpec
from pipeline.typed_config import ConfigError

BASE = {"name": "base", "repo": "meta-llama/Llama-3.1-8B"}
INSTRUCT = {"name": "instruct", "repo": "meta-llama/Llama-3.1-8B-Instruct"}
WEB = {"kind": "hf", "name": "monology/pile-uncopyrighted", "column": "text"}
CHATS = {"kind": "hf", "name": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "column": "messages"}


def config(models=(BASE, INSTRUCT), sources=(WEB, CHATS)) -> dict:
    return {"name": "sep", "store": "/tmp/never-created", "models": [dict(m) for m in models],
            "hooks": [{"layer": 1}],
            "tokens": {"context_length": 16, "n_tokens": 1600, "validation_fraction": 0.1,
                       "tokenizer": models[-1]["name"], "sources": [dict(s) for s in sources]}}


def load(mapping: dict):
    return parse_config(copy.deepcopy(mapping), "sep.toml", base_dir="/tmp")


@pytest.mark.parametrize("token", CHAT_TURN_TOKENS)
def test_a_chat_turn_separator_on_plain_text_read_by_a_base_model_is_refused(token):
    with pytest.raises(ConfigError) as e:
        load(config(sources=({**WEB, "separator": token}, CHATS)))
    msg = str(e.value)
    assert "tokens.sources[0].separator" in msg and token in msg and "'base'" in msg
    assert "'<|end_of_text|>'" in msg and "chat = 'yes'" in msg and "remove separator" in msg


@pytest.mark.parametrize("kind", [{"kind": "hf", "name": "x/y"},  # column unset: its text column
                                  {"kind": "hf", "name": "x/y", "column": "body", "chat": "no"}])
def test_every_plain_text_shape_is_checked(kind):
    with pytest.raises(ConfigError, match=r"tokens\.sources\[1\]\.separator"):
        load(config(sources=(CHATS, {**kind, "separator": "<|im_end|>"})))


def test_what_passes(tmp_path):
    # the base model's own end-of-text token for web text; the template's own end for conversations
    cfg = load(config(sources=({**WEB, "separator": "<|end_of_text|>"}, {**CHATS, "separator": "none"})))
    assert [s.separator for s in cfg.tokens.sources] == ["<|end_of_text|>", "none"]
    # conversations may end with an end-of-turn token: the chat template uses it so
    load(config(sources=({**WEB, "separator": "<|end_of_text|>"}, {**CHATS, "separator": "<|eot_id|>"})))
    load(config(sources=({**CHATS, "column": None, "chat": "yes", "separator": "<|eot_id|>"},)))
    # no base model reads the tokens: two chat models
    other = {"name": "tuned", "repo": "org/Llama-3.1-8B-Instruct-sft-math"}
    load(config(models=(INSTRUCT, other), sources=({**WEB, "separator": "<|eot_id|>"},)))
    # token ids are no plain text the config can judge
    (tmp_path / "ids.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    load(config(sources=({"kind": "tokenized", "paths": [str(tmp_path / "ids.jsonl")], "separator": "<|eot_id|>"},)))


def test_an_empty_separator_is_refused():
    with pytest.raises(ConfigError, match=r"tokens\.sources\[0\]\.separator: is empty .*'eos'.*'none'"):
        load(config(sources=({**WEB, "separator": ""},)))


@pytest.mark.parametrize("weights, chat", [
    ({"repo": "meta-llama/Llama-3.1-8B-Instruct"}, True), ({"repo": "google/gemma-2-2b-it"}, True),
    ({"repo": "Qwen/Qwen2.5-0.5B-Chat"}, True), ({"path": "/m/smollm2-135m-instruct/"}, True),
    ({"gguf": "/m/model-sft.gguf"}, True), ({"repo": "allenai/OLMo-2-1124-7B-DPO"}, True),
    ({"repo": "meta-llama/Llama-3.1-8B"}, False), ({"repo": "google/gemma-2-2b"}, False),
    ({"repo": "EleutherAI/pythia-1b"}, False), ({"path": "/m/smollm2-135m-kjv"}, False),
    ({"repo": "bigscience/bloom-1b1"}, False),  # "it" only as a whole word of the name
])
def test_which_weights_names_mark_a_chat_model(weights, chat):
    assert ModelSpec(name="m", **weights).is_chat_model is chat
