"""Step schedules: pure functions of the step, so a resumed run follows the same curve."""

import pytest

from trainer.schedules import k_at, l1_at, lr_factor, ramp


def test_k_schedule_holds_then_moves_linearly_then_stays():
    ks = [k_at(s, 8, 32, span=12, delay=5) for s in range(25)]
    assert ks[:6] == [32] * 6  # held for the delay, and the move starts from k_start
    assert ks[5:18] == [round(32 - 24 * i / 12) for i in range(13)]
    assert ks[17:] == [8] * 8
    assert all(a >= b for a, b in zip(ks, ks[1:]))


def test_k_schedule_from_below_and_without_one():
    assert [k_at(s, 10, 2, span=4) for s in range(6)] == [2, 4, 6, 8, 10, 10]
    assert {k_at(s, 10, None, span=4, delay=3) for s in range(10)} == {10}


def test_lr_warmup_and_decay():
    f = [lr_factor(s, 10, warmup_steps=2, decay_fraction=0.5) for s in range(10)]
    assert f == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]
    assert ramp(3, 0, 1.0, 5.0) == 5.0


def test_l1_schedule_holds_then_follows_its_line_then_stays():
    """Start 5, end 1, held 4 steps, then 8 steps down: the line through (4, 5) and (12, 1)."""
    got = [l1_at(s, 1.0, start=5.0, span=8, delay=4) for s in range(16)]
    assert got[:5] == [5.0] * 5
    for s in range(4, 13):
        assert got[s] == pytest.approx(5.0 + (1.0 - 5.0) * (s - 4) / 8), s
    assert got[12:] == [1.0] * 4
    assert got[8] == pytest.approx(3.0)  # halfway down


def test_l1_warmup_multiplies_the_line():
    """The warm-up's rise from 0 scales the scheduled value, from step 0 (not from the delay)."""
    for s in range(20):
        line = 6.0 if s < 2 else max(2.0, 6.0 - 4.0 * (s - 2) / 10)
        rise = min(1.0, s / 5)
        assert l1_at(s, 2.0, start=6.0, span=10, delay=2, warmup=5) == pytest.approx(rise * line), s
    # without a schedule: exactly the plain warm-up (the trainer's curve before schedules existed)
    assert [l1_at(s, 0.3, warmup=7) for s in range(10)] == [ramp(s, 7, 0.0, 0.3) for s in range(10)]
    assert {l1_at(s, 0.3, span=4, delay=2) for s in range(10)} == {0.3}  # no start: no line
