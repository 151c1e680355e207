"""The first-letter task's words, prompts and activations, on a tiny tokenizer and model."""

from __future__ import annotations

import random

import pytest
import torch

from evals.saebench.capture import activations_at, with_bos
from evals.saebench.config import LETTERS, AbsorptionSpec
from evals.saebench.words import build_prompts, collect_words, vocabulary_words
from mdiff.tiny import make_corpus, make_model, make_tokenizer
from pipeline.config import HookSpec
from pipeline.hooks import capture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("words")
    files = make_corpus(d / "corpus", n_docs=80)
    tok = make_tokenizer(files["text"].read_text().split("\n\n"), vocab_size=400)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_model(d / "m", tok, "llama", d_model=16, n_layers=2)).eval()
    return model, tok


def test_vocabulary_words_are_the_whole_word_alphabetic_tokens(tiny):
    _, tok = tiny
    words = vocabulary_words(tok)
    brute = {}
    for token, i in tok.get_vocab().items():
        text = tok.convert_tokens_to_string([token])
        if text.startswith(" ") and text[1:].isascii() and text[1:].isalpha() and \
                tok("\n" + text, add_special_tokens=False).input_ids == [*tok("\n", add_special_tokens=False).input_ids, i]:
            brute[text] = i
    assert words == dict(sorted(brute.items(), key=lambda kv: kv[1])) and len(words) > 10


def test_each_prompt_reads_the_word_token_after_solved_examples_of_the_same_split(tiny):
    _, tok = tiny
    words = dict(list(vocabulary_words(tok).items())[:12])
    spec = AbsorptionSpec(icl_examples=3)
    seqs, positions, ok = build_prompts(tok, words, spec, random.Random(0))
    assert all(ok)
    for (word, token), seq, pos in zip(words.items(), seqs, positions):
        assert seq[0] == tok.bos_token_id and seq[pos] == token
        text = tok.decode(seq[1:])
        lines = text.strip("\n").split("\n")
        assert lines[-1] == spec.prompt_template.format(word=word)
        assert len(lines) == 4 and word not in [line.split(" has")[0] for line in lines[:-1]]
        for line in lines[:-1]:
            w, answer = line.split(" has the first letter: ")
            assert w in words and answer == w.strip()[0].upper()
        # what follows the word's token is the rest of the template (with a real tokenizer's
        # " has", " the", " first", " letter", ":" the word is SAEBench's position -6)
        assert tok.decode(seq[pos + 1:]) == " has the first letter:"


def test_activations_are_read_at_the_word_and_scaled_like_the_store(tiny):
    model, tok = tiny
    hook = HookSpec(1, "resid_post")
    seqs = [with_bos(tok, tok(t, add_special_tokens=False).input_ids) for t in ["the king", "a small old house", "x"]]
    positions = [1, 3, 1]
    got = activations_at(model, seqs, positions, hook, 0.5, pad=2, batch_size=2)
    for seq, pos, row in zip(seqs, positions, got):
        with torch.inference_mode():
            h = capture(model, torch.tensor([seq]), [hook])[hook][0, pos]
        assert torch.allclose(row, 0.5 * h.float(), atol=1e-5)


def test_collected_words_split_without_overlap_and_reproducibly(tiny):
    model, tok = tiny
    spec = AbsorptionSpec(icl_examples=2, words=20, test_fraction=0.25)
    a = collect_words(model, tok, HookSpec(1, "resid_post"), 1.0, spec, seed=7)
    b = collect_words(model, tok, HookSpec(1, "resid_post"), 1.0, spec, seed=7)
    assert a.words == b.words and torch.equal(a.x, b.x) and len(a.words) == 20
    train, test = a.split(test=False)[0], a.split(test=True)[0]
    assert len(test) == 5 and not set(train) & set(test)
    assert [LETTERS[i] for i in a.letters.tolist()] == [w.strip()[0].lower() for w in a.words]
