"""Progress: seconds per step, tokens per second and an ETA from the recent pace."""

import logging

import pytest

from training.progress import Progress, format_duration


def test_pace_and_eta_follow_the_recent_steps(caplog):
    clock = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # steps of 2 s, 1 s and 4 s
    progress = Progress(total_steps=10, done_steps=0, show_bar=False, clock=lambda: next(clock))
    paces = []
    with caplog.at_level(logging.INFO, logger="training"):
        for tokens in (100, 300, 200):
            progress.start_step()
            paces.append(progress.end_step(tokens, loss=1.5))
        progress.show_eval(0.75, {"a": 0.5, "b": 1.0})
    assert [p.step_seconds for p in paces] == [2.0, 1.0, 4.0]
    assert [p.tokens_per_second for p in paces] == [50.0, 300.0, 50.0]
    assert paces[-1].eta_seconds == pytest.approx((2 + 1 + 4) / 3 * 7)  # mean pace x steps left
    assert "eval at step 3: mean loss 0.7500 (a 0.5000, b 1.0000)" in caplog.text
    assert "step 2/10  loss 1.5000  300 tok/s  1.00 s/step  ETA 00:12" in caplog.text  # every 5% of 10 steps


def test_durations_read_as_clock_times():
    assert format_duration(75) == "01:15"
    assert format_duration(3 * 3600 + 61) == "3:01:01"
