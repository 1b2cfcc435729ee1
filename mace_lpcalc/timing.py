"""Wall-clock timing of device work: synchronise around each call, report the median."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(call, device: str, warmup: int, repeats: int) -> float:
    """Median wall time of ``call()`` in ms, synchronising the device around each call."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
