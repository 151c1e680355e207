"""Step -> hyperparameter schedules. Pure functions of the step, so a resumed run follows the same
curve without any saved schedule state."""

from __future__ import annotations


def lr_factor(step: int, steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warmup from 0, flat, then linear decay to 0 over the final `decay_fraction`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = int(steps * decay_fraction)
    decay_start = steps - decay_steps
    if decay_steps > 0 and step >= decay_start:
        return max(0.0, (steps - step) / decay_steps)
    return 1.0


def ramp(step: int, span: int, start: float, end: float) -> float:
    """Linear move from `start` to `end` over `span` steps, then `end`."""
    if span <= 0 or step >= span:
        return end
    return start + (end - start) * step / span


def k_at(step: int, k: int, k_start: int | None, span: int, delay: int = 0) -> int:
    """The k schedule: k_start (default k) for `delay` steps, then linearly to k over `span` steps,
    rounded to a whole number of latents. Holding k_start first lets the dictionary settle at the
    start L0 before the transition (the toy study's schedule from above does this)."""
    if k_start is None or step < delay:
        return k if k_start is None else k_start
    return max(1, round(ramp(step - delay, span, k_start, k)))


def l1_at(step: int, l1: float, start: float | None = None, span: int = 0, delay: int = 0,
          warmup: int = 0) -> float:
    """The relu L1 coefficient at `step`: the schedule's line times the warm-up's rise.

    The line: `start` (default `l1`: no schedule) for `delay` steps, then linearly to `l1` over
    `span` steps, then `l1`. The warm-up multiplies it by a factor rising linearly from 0 to 1 over
    `warmup` steps, counted from step 0 like the line, so the two compose as
    `min(1, step / warmup) * line(step)`: a dictionary starts unpenalised whatever its start value,
    and without a schedule this is the plain warm-up to `l1`.
    """
    if start is None:
        line = l1
    else:
        line = start if step < delay else ramp(step - delay, span, start, l1)
    return ramp(step, warmup, 0.0, line)
