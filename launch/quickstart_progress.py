"""How far the whole quickstart is, not only its training: elapsed time at every stage and, during training, an
estimate of the time left until the job (export, sample and report included) is done.

Imported only once the quickstart trains (it pulls in trainer.hooks, hence torch).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from launch.quickstart import clock
from trainer.hooks import Hook, RunContext, StepOutput, TrainState

log = logging.getLogger("launch.quickstart")

# Export + sample + report after training, measured on 2 cores (docs/benchmarks.md): 3.8 s idle, 5.2 s with a load
# average of 16. Small next to training, so one rounded constant is close enough for an ETA.
AFTER_TRAINING_S = 6.0
LINES_PER_RUN = 10  # whole-job lines during training: about ten, whatever train.max_steps is


class WholeJobEta(Hook):
    """Every ~1/10 of training (on a log step), one line: elapsed, and time left for the whole job. The step rate is
    measured from the end of the first step on, so start-up and the first step's warm-up do not inflate it."""

    def __init__(self, job_started_s: float) -> None:
        self.job_started_s = job_started_s
        self.first_step: int | None = None
        self.first_step_done_s = 0.0

    def on_step_end(self, run: RunContext, state: TrainState, out: StepOutput) -> None:
        now_s = time.perf_counter()
        if self.first_step is None:
            self.first_step, self.first_step_done_s = state.step, now_s
            return
        train = run.cfg.train
        logs_per_line = max(1, round(train.max_steps / LINES_PER_RUN / train.log_interval_steps))
        every_steps = train.log_interval_steps * logs_per_line
        if state.step % every_steps or state.step >= train.max_steps:
            return
        step_s = (now_s - self.first_step_done_s) / (state.step - self.first_step)
        training_left_s = (train.max_steps - state.step) * step_s
        log.info(self.line(now_s, training_left_s))

    def line(self, now_s: float, training_left_s: float) -> str:
        return (f"quickstart: {clock(now_s - self.job_started_s)} elapsed, about "
                f"{clock(training_left_s + AFTER_TRAINING_S)} left for the whole job (training "
                f"{clock(training_left_s)}, then export, sample and report ~{AFTER_TRAINING_S:.0f} s)")


def whole_job_eta(job_started_s: float) -> list[Any]:
    return [WholeJobEta(job_started_s)]
