"""The first-letter task's data: words from the model's own vocabulary, SAEBench's prompts, and the
activation at each word's token.

Words are whole-word alphabetic tokens: a vocabulary entry that is the tokenizer's word-boundary
marker (byte-level BPE's "Ġ", SentencePiece's "▁") followed by ASCII letters only, kept when the
tokenizer reads " word" after a newline back as that very token (so the word is one token where
the prompt puts it). They are shuffled with the seed and split into train and held-out words.

Each prompt is SAEBench's: `icl_examples` solved examples drawn from the same split (never the
word itself), each on its own line, then the template with the word:

    "\\n tree has the first letter: T\\n ... \\n king has the first letter:"

and the activation is read at the word's token (SAEBench's position -6 for this template),
found by tokenizing the prompt up to the word.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from evals.saebench.capture import activations_at, pad_id, with_bos
from evals.saebench.config import LETTERS, AbsorptionSpec, SaeBenchError
from pipeline.config import HookSpec

_WORD_TOKEN = re.compile(r"(?:Ġ|▁)([A-Za-z]+)")


@dataclass
class WordData:
    """Words, their first letters and activations, split into train and held-out (test) words."""

    words: list[str]  # as put in the prompt, with the leading space: " tree"
    letters: Tensor  # [n] int64 index into LETTERS
    x: Tensor  # [n, d_model] normalized activations at the word's token
    test: Tensor  # [n] bool: held-out words

    def split(self, test: bool) -> tuple[list[str], Tensor, Tensor]:
        keep = self.test if test else ~self.test
        return [w for w, k in zip(self.words, keep.tolist()) if k], self.letters[keep], self.x[keep]


def vocabulary_words(tokenizer) -> dict[str, int]:
    """" word" -> token id for every whole-word alphabetic token the tokenizer reads back as itself
    after a newline, in token-id order."""
    candidates = sorted((i, " " + m.group(1)) for tok, i in tokenizer.get_vocab().items()
                        if (m := _WORD_TOKEN.fullmatch(tok)))
    if not candidates:
        return {}
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    encoded = tokenizer(["\n" + w for _, w in candidates], add_special_tokens=False).input_ids
    return {w: i for (i, w), ids in zip(candidates, encoded) if ids == [*newline, i]}


def first_letter(word: str) -> int:
    return LETTERS.index(word.strip()[0].lower())


def _example(template: str, word: str) -> str:
    return template.format(word=word) + " " + word.strip()[0].upper()


def build_prompts(tokenizer, words: dict[str, int], spec: AbsorptionSpec, rng: random.Random
                  ) -> tuple[list[list[int]], list[int], list[bool]]:
    """(token ids with BOS, the word token's position, whether that token is the word's) per word.

    The examples come from the same words (one split), never the word itself.
    """
    pool = list(words)
    before = spec.prompt_template[:spec.prompt_template.index("{word}")]
    seqs, positions, ok = [], [], []
    for word, token in words.items():
        others = [w for w in rng.sample(pool, min(len(pool), spec.icl_examples + 1)) if w != word]
        head = "\n" + "".join(_example(spec.prompt_template, w) + "\n" for w in others[:spec.icl_examples])
        body = tokenizer(head + spec.prompt_template.format(word=word), add_special_tokens=False).input_ids
        prefix = tokenizer(head + before + word, add_special_tokens=False).input_ids
        full = with_bos(tokenizer, body)
        offset = len(full) - len(body)
        seqs.append(full)
        positions.append(offset + len(prefix) - 1)
        ok.append(body[:len(prefix)] == prefix and prefix[-1] == token)
    return seqs, positions, ok


def collect_words(model, tokenizer, hook: HookSpec, scale: float, spec: AbsorptionSpec, *, seed: int,
                  progress: bool = False) -> WordData:
    """Pick and split the words, build their prompts, run the model once over all of them."""
    rng = random.Random(seed)
    vocab = vocabulary_words(tokenizer)
    words = list(vocab)
    if spec.words and spec.words < len(words):
        words = rng.sample(words, spec.words)
    rng.shuffle(words)
    n_test = max(1, round(len(words) * spec.test_fraction))
    if len(words) - n_test < 2:
        raise SaeBenchError(f"the tokenizer has {len(vocab)} whole-word alphabetic tokens: too few to "
                            "train and test a first-letter probe; set [saebench.absorption] enabled = false")
    kept, letters, is_test, seqs, positions = [], [], [], [], []
    for test, split in ((False, words[n_test:]), (True, words[:n_test])):
        s, p, ok = build_prompts(tokenizer, {w: vocab[w] for w in split}, spec, rng)
        for word, seq, pos, good in zip(split, s, p, ok):
            if good:
                kept.append(word)
                letters.append(first_letter(word))
                is_test.append(test)
                seqs.append(seq)
                positions.append(pos)
    x = activations_at(model, seqs, positions, hook, scale, pad=pad_id(tokenizer), batch_size=spec.batch_size,
                       progress=progress, desc="absorption prompts")
    return WordData(kept, torch.as_tensor(letters, dtype=torch.long), x, torch.as_tensor(is_test))
