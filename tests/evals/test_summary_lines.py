"""The evaluation log's lines for one dictionary, from splice.json's metrics and diff.json."""

from __future__ import annotations

from evals.run import summary_lines


def metrics(**per_model):
    return {"l0": 31.96, "dead_latents": None, "silent_on_eval": 2, "silent_on_eval_tokens": 254,
            "per_model": per_model}


def model(ce_diff=0.1413, stderr=0.0232):
    return {"ce_diff": ce_diff, "ce_diff_stderr": stderr, "ce_loss_score": 0.986, "explained_variance": 0.85}


def test_the_splice_line_gives_ce_diff_with_its_standard_error_and_names_its_ev():
    diff = {"reconstruction_by_source": {
        "base": {"typical": {"explained_variance": 0.8016, "tokens": 73122}, "all": {}},
        "kjv": {"typical": {"explained_variance": 0.8104, "tokens": 73122}}}}
    lines = summary_lines("btk", metrics(base=model(), kjv=model(0.2531, 0.0197)), diff)
    assert lines[0] == ("  btk: L0 32.0, dead in training unknown, silent on eval 2 (on 254 tokens), "
                        "base: ΔCE 0.1413 ± 0.0232 CE recovered 0.986 EV 0.850, "
                        "kjv: ΔCE 0.2531 ± 0.0197 CE recovered 0.986 EV 0.850 "
                        "(EV of the spliced tokens, high-norm ones included)")
    assert lines[1].endswith("base 0.802 (73,122 tokens), kjv 0.810 (73,122 tokens)")


def test_a_null_metric_reads_n_a_and_no_stored_ev_means_no_second_line():
    """One spliced sequence has no standard error: splice.json holds null there."""
    lines = summary_lines("sae", metrics(base=model(stderr=None)), {})
    assert lines == ["  sae: L0 32.0, dead in training unknown, silent on eval 2 (on 254 tokens), "
                     "base: ΔCE 0.1413 ± n/a CE recovered 0.986 EV 0.850 "
                     "(EV of the spliced tokens, high-norm ones included)"]
