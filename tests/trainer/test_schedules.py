"""Step schedules: pure functions of the step, so a resumed run follows the same curve."""

from trainer.schedules import k_at, lr_factor, ramp


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
