"""What a person watching a run sees: per step, the time it took, tokens per second (padding
excluded), the time left, the loss and the latest eval figures — on the progress bar, or as log
lines when the bar is off — and the same figures for `log.jsonl`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("training")

RECENT_STEPS = 20  # the ETA follows the recent pace: the first steps pay for warm-up


@dataclass
class StepPace:
    step_seconds: float
    tokens_per_second: float
    eta_seconds: float


class Progress:
    """A tqdm bar (or log lines every ~5% of the run) with speed, ETA, loss and eval figures."""

    def __init__(
        self, total_steps: int, done_steps: int, show_bar: bool, clock: Callable[[], float] = time.perf_counter, log_lines: bool = True
    ) -> None:
        """`log_lines`: log the figures when the bar is off (False on all but one process)."""
        from tqdm import tqdm

        self.total, self.done = total_steps, done_steps
        self.show_bar = show_bar
        self.log_lines = log_lines and not show_bar
        self.bar = tqdm(total=total_steps, initial=done_steps, disable=not show_bar, unit="step", dynamic_ncols=True)
        self.recent: list[float] = []
        self.eval_text = ""
        self.clock, self.started = clock, 0.0

    def start_step(self) -> None:
        self.started = self.clock()

    def end_step(self, tokens: int, loss: float) -> StepPace:
        seconds = self.clock() - self.started
        self.done += 1
        self.recent = (self.recent + [seconds])[-RECENT_STEPS:]
        pace = StepPace(seconds, tokens / seconds if seconds > 0 else 0.0,
                        sum(self.recent) / len(self.recent) * (self.total - self.done))
        text = {"loss": f"{loss:.4f}", "tok/s": f"{pace.tokens_per_second:.0f}", "s/step": f"{seconds:.2f}"}
        if self.eval_text:
            text["eval"] = self.eval_text
        self.bar.update(1)
        self.bar.set_postfix(text)
        if self.log_lines and (self.done % max(1, self.total // 20) == 0 or self.done == self.total):
            log.info("step %d/%d  loss %.4f  %.0f tok/s  %.2f s/step  ETA %s%s", self.done, self.total, loss,
                     pace.tokens_per_second, seconds, format_duration(pace.eta_seconds),
                     f"  eval {self.eval_text}" if self.eval_text else "")
        return pace

    def show_eval(self, mean_loss: float, task_losses: dict[str, float]) -> None:
        self.eval_text = f"{mean_loss:.4f}"
        if self.log_lines:
            per_task = ", ".join(f"{name} {loss:.4f}" for name, loss in task_losses.items())
            log.info("eval at step %d: mean loss %.4f (%s)", self.done, mean_loss, per_task)

    def close(self) -> None:
        self.bar.close()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"
