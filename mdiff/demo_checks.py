"""The demo's three independent answers to "what did the fine-tune change?", each with its numbers.

1. **The activation-difference lens** (`evals.diff_lens`): the mean of h_kjv - h_base over the
   first positions of Austen text, read through the fine-tuned model's final norm and unembedding
   at the last layer. Its top 20 promoted tokens are counted as Bible vocabulary when they are at
   least 5x more frequent in the Bible than in Austen (`count_marked`); the 20 most frequent
   tokens of the Austen text the lens read are counted the same way, as the chance level.
   YES when at least 5 of the 20 are Bible-marked and more than the chance level.
2. **Source preference of the crosscoder latents** (`evals.by_source`): do the latents specific
   to (or leaning toward) the fine-tuned model fire more on Bible text than on Austen?
3. **Latent Scaling of the exclusive latents** (`evals.latent_scaling`): of the latents whose
   decoder lives in the fine-tuned model only (Minder's Delta >= 0.9), which are genuine (low nu:
   the base model does not have them) and which are artifacts (complete shrinkage, decoupling),
   and do the genuine ones prefer Bible text? NO ANSWER when no latent is exclusive.

Every check reads the outputs of the evaluation (eval dirs), so it costs no model forward.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BASE, TUNED = "base", "kjv"  # the demo's model names; "kjv" is the fine-tuned one
SOURCES = ("kjv", "austen")  # token-set source 0 and 1
LENS_TOP, LENS_RATIO, LENS_MIN = 20, 5.0, 5


@dataclass
class LensCheck:
    tokens: list[str]  # the lens's top promoted tokens (fine-tuned model's unembedding)
    marked: list[str]  # those at least LENS_RATIO x more frequent in the Bible than in Austen
    chance_tokens: list[str]  # the most frequent tokens of the text the lens read
    chance_marked: int
    layer_note: str
    n_sequences: int
    holds: bool | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScalingCheck:
    dictionary: str
    n_tokens: int  # validation tokens Latent Scaling read
    exclusive: dict[str, int]  # class -> latents exclusive to the fine-tuned model
    genuine: list[int] = field(default_factory=list)
    genuine_preference: float | None = None  # mean p = f(kjv) / (f(kjv) + f(austen)) of the genuine ones
    holds: bool | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _marked(tokens: list[str], bible: str, austen: str) -> list[str]:
    from evals.diff_lens import count_marked

    return [t for t in tokens if count_marked([t], bible, austen, LENS_RATIO)]


def lens_check(lens_json: Path, tokenizer, bible: str, austen: str, read_text: str) -> LensCheck:
    """Check 1 from the lens's diff_lens.json. `read_text` is the text the lens read."""
    from evals.diff_lens import top_tokens

    result = json.loads(Path(lens_json).read_text())
    tokens = top_tokens(result)[:LENS_TOP]
    marked = _marked(tokens, bible, austen)
    ids = tokenizer(read_text[:400_000], add_special_tokens=False)["input_ids"]
    frequent = [tokenizer.decode([i]) for i, _ in Counter(ids).most_common(LENS_TOP)]
    chance = len(_marked(frequent, bible, austen))
    n = len(marked)
    holds = n >= LENS_MIN and n > chance
    reason = (f"{n} of the lens's top {len(tokens)} tokens are Bible vocabulary (>= {LENS_RATIO:g}x more "
              f"frequent in the Bible than in Austen), against {chance} of Austen's {len(frequent)} most "
              f"frequent tokens" + ("" if holds else f": need at least {LENS_MIN} and more than that"))
    return LensCheck(tokens, marked, frequent, chance, result.get("layer_note", ""),
                     int(result.get("n_sequences", 0)), holds, reason)


def scaling_check(scaling_json: Path, freq_a: np.ndarray, freq_b: np.ndarray, dictionary: str) -> ScalingCheck:
    """Check 3 from latent_scaling.json and the latents' per-source firing frequencies."""
    data = json.loads(Path(scaling_json).read_text())
    pair = next((p for p in data["pairs"] if p["base"] == BASE and p["ft"] == TUNED), None)
    if pair is None:
        return ScalingCheck(dictionary, int(data.get("n_tokens", 0)), {}, holds=None,
                            reason=f"no Latent Scaling of {BASE} -> {TUNED} in {scaling_json}")
    exclusive = {c: len(ids) for c, ids in pair["exclusive"].items()}
    genuine = [int(j) for j in pair["exclusive"].get("genuine", [])]
    check = ScalingCheck(dictionary, int(data["n_tokens"]), exclusive, genuine)
    total = sum(exclusive.values())
    if total == 0:
        check.reason = f"no latent is exclusive to {TUNED} ({data['thresholds'].get('exclusive', 'Delta >= 0.9')})"
        return check
    if not genuine:
        check.holds = False
        check.reason = f"{total} latent(s) exclusive to {TUNED}, none genuine by Latent Scaling (all artifacts)"
        return check
    fa, fb = freq_a[genuine], freq_b[genuine]
    live = (fa + fb) > 0
    pref = float(np.mean(fa[live] / (fa[live] + fb[live]))) if live.any() else None
    check.genuine_preference = pref
    check.holds = pref is not None and pref > 0.5
    check.reason = (f"{len(genuine)} of {total} exclusive latent(s) are genuine; their mean preference for "
                    f"{SOURCES[0]} is " + ("undefined (silent)" if pref is None else f"{pref:.2f}"))
    return check


def _verdict(holds: bool | None) -> str:
    return {True: "YES", False: "NO", None: "NO ANSWER"}[holds]


def print_reconstruction(eval_dirs: list[Path], log=print) -> None:
    """Explained variance of every dictionary on the stored validation tokens, per model and text;
    the few high-norm tokens (attention sinks) apart, since pooled with the rest they set the
    number (evals/stored_reconstruction.py)."""
    log("== Explained variance on the stored validation tokens (no forward pass), per model ==")
    log("   typical tokens and per text; then the high-norm tokens (norm > 10x the mean), and all together")
    for ev in eval_dirs:
        for diff_json in sorted(Path(ev).glob("*/diff.json")):
            by_model = json.loads(diff_json.read_text()).get("reconstruction_by_source") or {}
            for model, groups in by_model.items():
                log(f"  {diff_json.parent.name:<20} {model:<6} " + reconstruction_line(groups))


def reconstruction_line(groups: dict) -> str:
    def ev(name: str) -> str:
        return f"{name} {groups[name]['explained_variance']:.3f} ({groups[name]['tokens']:,} tokens)"

    texts = [g for g in groups if g not in ("all", "typical", "high_norm")]
    parts = [ev(g) for g in ("typical", *texts) if g in groups]
    if "high_norm" in groups:
        parts += [ev("high_norm"), ev("all")]
    return ", ".join(parts)


def print_checks(lens: LensCheck | None, scaling: list[ScalingCheck], log=print, *, lens_part: bool = True) -> None:
    if lens_part:
        _print_lens(lens, log)
    if scaling:
        _print_scaling(scaling, log)


def _print_lens(lens: LensCheck | None, log) -> None:
    log("== Check: the activation-difference lens (no dictionary) ==")
    if lens is None:
        log("  not computed")
    else:
        log(f"  {TUNED} - {BASE} on {lens.n_sequences} Austen windows, {lens.layer_note}")
        log("  top tokens: " + " ".join(repr(t) for t in lens.tokens))
        log(f"  Bible-marked: {len(lens.marked)} ({' '.join(repr(t) for t in lens.marked)}); "
            f"chance level: {lens.chance_marked} of Austen's most frequent tokens")
        log(f"    -> {_verdict(lens.holds)}: {lens.reason}")


def _print_scaling(scaling: list[ScalingCheck], log) -> None:
    log(f"== Check: Latent Scaling of the latents exclusive to {TUNED} (genuine, or an artifact?) ==")
    for c in scaling:
        counts = ", ".join(f"{k} {v}" for k, v in c.exclusive.items()) or "none"
        log(f"  {c.dictionary} ({c.n_tokens:,} validation tokens): exclusive latents by class: {counts}")
        log(f"    -> {_verdict(c.holds)}: {c.reason}")
