"""The demo's lens and Latent Scaling checks on planted outputs whose answers are known."""

from __future__ import annotations

import json

import numpy as np

from mdiff import demo_checks as DC

BIBLE = "And the LORD said unto Moses, thou shalt keep my commandment, for thus saith the LORD. " * 50
AUSTEN = "Elizabeth said to Mr. Darcy that the weather was fine, and the ball was delightful. " * 50


class WordTokenizer:
    """Whitespace words as tokens, each decoded with its leading space."""

    def __init__(self):
        self.vocab: list[str] = []

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for w in text.split():
            if " " + w not in self.vocab:
                self.vocab.append(" " + w)
            ids.append(self.vocab.index(" " + w))
        return {"input_ids": ids}

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def _lens_json(tmp_path, tokens):
    path = tmp_path / "diff_lens.json"
    promoted = [{"token": t, "logit": 1.0} for t in tokens]
    path.write_text(json.dumps({"ft": "kjv", "n_sequences": 7, "layer_note": "layer 29 (the last)",
                                "readers": {"kjv": {"overall": {"promoted": promoted, "suppressed": []}}}}))
    return path


def test_lens_check_counts_bible_tokens_against_the_chance_level(tmp_path):
    bible_tokens = [" unto", " LORD", " thou", " shalt", " saith", " commandment"]
    check = DC.lens_check(_lens_json(tmp_path, bible_tokens + [" the", " was"]), WordTokenizer(), BIBLE, AUSTEN,
                          AUSTEN)
    assert check.marked == bible_tokens and check.chance_marked == 0 and check.holds is True
    weak = DC.lens_check(_lens_json(tmp_path, [" unto", " the", " was", " ball"]), WordTokenizer(), BIBLE, AUSTEN,
                         AUSTEN)
    assert weak.marked == [" unto"] and weak.holds is False  # fewer than 5 marked
    assert "need at least 5" in weak.reason


def _scaling_json(tmp_path, exclusive: dict):
    path = tmp_path / "latent_scaling.json"
    path.write_text(json.dumps({"n_tokens": 1000, "thresholds": {"exclusive": "Delta >= 0.9"},
                                "pairs": [{"base": "base", "ft": "kjv", "exclusive": exclusive}]}))
    return path


def test_scaling_check_answers_by_the_genuine_latents_preference(tmp_path):
    fa = np.array([0.0, 0.3, 0.1, 0.0, 0.2])
    fb = np.array([0.0, 0.1, 0.3, 0.0, 0.2])
    yes = DC.scaling_check(_scaling_json(tmp_path, {"genuine": [1, 4], "shrinkage": [2]}), fa, fb, "cc")
    assert yes.holds is True and yes.exclusive == {"genuine": 2, "shrinkage": 1}
    np.testing.assert_allclose(yes.genuine_preference, (0.75 + 0.5) / 2)
    no = DC.scaling_check(_scaling_json(tmp_path, {"genuine": [2]}), fa, fb, "cc")
    assert no.holds is False and no.genuine_preference == 0.25
    artifacts = DC.scaling_check(_scaling_json(tmp_path, {"shrinkage": [1, 2]}), fa, fb, "cc")
    assert artifacts.holds is False and "none genuine" in artifacts.reason
    none = DC.scaling_check(_scaling_json(tmp_path, {}), fa, fb, "cc")
    assert none.holds is None and "no latent is exclusive to kjv (Delta >= 0.9)" in none.reason


def test_reconstruction_line_puts_typical_and_texts_first_and_high_norm_tokens_apart():
    def m(ev, n):
        return {"explained_variance": ev, "tokens": n}

    groups = {"all": m(0.98, 1030), "typical": m(0.8, 1000), "kjv.txt": m(0.79, 600), "austen.txt": m(0.81, 400),
              "high_norm": m(0.999, 30)}
    assert DC.reconstruction_line(groups) == ("typical 0.800 (1,000 tokens), kjv.txt 0.790 (600 tokens), "
                                              "austen.txt 0.810 (400 tokens), high_norm 0.999 (30 tokens), "
                                              "all 0.980 (1,030 tokens)")
    del groups["high_norm"]  # no high-norm token: "all" would repeat "typical"
    assert DC.reconstruction_line(groups).endswith("austen.txt 0.810 (400 tokens)")
