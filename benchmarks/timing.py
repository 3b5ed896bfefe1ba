"""Wall-clock timing shared by the benchmarks: the device is synchronised around every timed call, candidates are
interleaved so machine noise hits them alike, and medians are reported."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from transformers import TrainerCallback


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each candidate: one warm-up call each, then `repeats` rounds interleaving them."""
    times = {name: [] for name in candidates}
    for run in candidates.values():
        run()
    for _ in range(repeats):
        for name, run in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


class StepTimer(TrainerCallback):
    """Seconds of every optimizer step (forward, backward, step), each task's first step apart: it pays one-off
    costs (compilation, allocation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps: list[list[float]] = []  # per task, every step but the first
        self.first: list[float] = []  # per task, its first step
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append([])

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        if len(self.first) < len(self.steps):
            self.first.append(seconds)
        else:
            self.steps[-1].append(seconds)

    @property
    def per_task_ms(self) -> list[float]:
        """Median step of each task in ms (its first step only when it had no other)."""
        return [1000 * statistics.median(steps or [first]) for steps, first in zip(self.steps, self.first)]

    @property
    def step_s(self) -> float:
        """Median step over all tasks in seconds, first steps left out unless there is nothing else."""
        steps = [s for task in self.steps for s in task]
        return statistics.median(steps or self.first)
