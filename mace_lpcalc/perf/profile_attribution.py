"""Attribution of one profiled call's time to the block ranges of :mod:`mace_lpcalc.perf.profile`.

Reads the events ``torch.profiler`` recorded while the ranges named ``RANGE_PREFIX +
block`` were open (one ``call`` range per profiled call):

* Host time: the calling thread's timeline of each call is cut at every range boundary;
  each piece belongs to the innermost range open over it, except pieces during which the
  autograd engine was evaluating a backward node (``autograd::engine::evaluate_function``
  events, on any thread), which belong to ``backward (forces)``. The rows therefore
  partition the call: they add up to its profiled wall time. Time a group (an
  interaction, a product, the model, the calculator) spends outside its named children
  is its ``(other)`` row. On CUDA host time is launch/dispatch time plus any wait for
  the device (the copy of the results out waits for all kernels).
* Device time: the profiler links each GPU activity (kernel, memcpy, memset) to the
  CPU operator that launched it by correlation id and lists it in that operator's
  ``kernels``; the innermost range enclosing the operator (its ``cpu_parent`` chain) owns
  the activity, and an operator under a backward node belongs to ``backward (forces)``.
  A row's device time is the sum of its activities' durations. The whole call's device
  time is the union of the activity intervals inside the call (overlaps counted once), so
  it is also correct with several streams. Activities no range owns (no recorded launching
  operator, or one outside every range) make up the ``unattributed`` row.

Also here: the device busy time of any window, the kernels with the most device time and
the GPU-bound verdict.
"""

from __future__ import annotations

import bisect
import itertools

from torch.autograd import DeviceType

#: The device must be busy at least this fraction of the wall time to call a run GPU-bound.
GPU_BOUND_FRACTION = 0.8
RANGE_PREFIX = "mace_lpcalc::"
CALL = "call"
BACKWARD = "backward (forces)"
OUTSIDE_MODEL = "calculator (outside model)"
UNATTRIBUTED = "unattributed"
_BACKWARD_EVENT_PREFIX = "autograd::engine::evaluate_function"
ATTRIBUTION = (
    "host: each call's calling-thread timeline is split at range boundaries, each piece going to "
    "the innermost open range, or to the backward row while an autograd node is evaluated; rows "
    "sum to the profiled call. device: each kernel/memcpy/memset goes to the innermost range "
    "around the CPU operator that launched it (correlation id, then cpu_parent chain), or to "
    "'unattributed'; whole-call device time is the union of activity intervals inside the call.")


def bound_verdict(device_ms: float | None, wall_ms: float,
                  threshold: float = GPU_BOUND_FRACTION) -> str:
    """``"GPU-bound"`` if the device is busy ``>= threshold`` of the wall time, else
    ``"CPU/dispatch-bound"``; ``device_ms=None`` (a CPU run) gives ``"no device (CPU run)"``."""
    if not wall_ms > 0:
        raise ValueError(f"wall time must be positive, got {wall_ms} ms")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if device_ms is None:
        return "no device (CPU run)"
    if not device_ms >= 0:
        raise ValueError(f"device time must be non-negative, got {device_ms} ms")
    return "GPU-bound" if device_ms >= threshold * wall_ms else "CPU/dispatch-bound"


def merge_intervals(intervals) -> list[tuple[float, float]]:
    """Sorted, disjoint union of ``(start, end)`` intervals (touching ones merged)."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if end < start:
            raise ValueError(f"interval ends before it starts: ({start}, {end})")
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


class _Coverage:
    """Length of a merged interval set inside any window, in O(log n)."""

    def __init__(self, merged: list[tuple[float, float]]):
        self.starts = [start for start, _ in merged]
        self.ends = [end for _, end in merged]
        self.prefix = [0.0]
        for start, end in merged:
            self.prefix.append(self.prefix[-1] + end - start)

    def _below(self, t: float) -> float:
        """Covered length in (-inf, t]."""
        index = bisect.bisect_right(self.starts, t)
        if index == 0:
            return 0.0
        return self.prefix[index - 1] + min(t, self.ends[index - 1]) - self.starts[index - 1]

    def within(self, start: float, end: float) -> float:
        return self._below(end) - self._below(start)


def _row_of_range(name: str, kinds: dict[str, str]) -> str:
    if name == CALL:
        return OUTSIDE_MODEL
    return f"{name} (other)" if kinds[name] == "group" else name


def is_device_activity(event) -> bool:
    """A kernel, memcpy or memset on the GPU (not the GPU-side mirror of a CPU range)."""
    return (event.device_type != DeviceType.CPU and not event.is_user_annotation
            and not event.name.startswith((RANGE_PREFIX, "ProfilerStep")))


def _is_kernel(name: str) -> bool:
    return not name.lower().startswith(("memcpy", "memset"))


def attribute(events, kinds: dict[str, str], with_device: bool) -> dict:
    """Per-row host/device totals and whole-call numbers from the profiler's events.

    ``kinds`` maps each range name (without prefix, ``call`` included) to ``"block"`` or
    ``"group"``. Returns ``{"rows": {row: totals}, "calls": [per-call numbers]}``.
    """
    ranges = [e for e in events if e.device_type == DeviceType.CPU
              and e.name.startswith(RANGE_PREFIX)]
    calls = sorted((e for e in ranges if e.name == RANGE_PREFIX + CALL),
                   key=lambda e: e.time_range.start)
    if not calls:
        raise RuntimeError("the profiler recorded no calls")
    main_thread = calls[0].thread
    backward = _Coverage(merge_intervals(
        (e.time_range.start, e.time_range.end) for e in events
        if e.device_type == DeviceType.CPU and e.name.startswith(_BACKWARD_EVENT_PREFIX)))

    rows: dict[str, dict] = {}

    def row(name):
        return rows.setdefault(name, {"calls": 0, "host_us": 0.0, "device_us": 0.0,
                                      "kernels": 0, "first_start": float("inf")})

    timeline = sorted((e for e in ranges if e.thread == main_thread),
                      key=lambda e: (e.time_range.start, -e.time_range.end))
    for event in timeline:
        name = event.name.removeprefix(RANGE_PREFIX)
        target = row(_row_of_range(name, kinds))
        target["calls"] += 1
        target["first_start"] = min(target["first_start"], event.time_range.start)
    backward_row = row(BACKWARD)
    backward_row["calls"] = len(calls)

    # Host: cut each call at every range boundary; a piece belongs to the innermost range
    # over it, or to the backward pass while an autograd node was being evaluated.
    for call in calls:
        inside = [e for e in timeline if call.time_range.start <= e.time_range.start
                  and e.time_range.end <= call.time_range.end]
        cuts = sorted({t for e in inside for t in (e.time_range.start, e.time_range.end)})
        for start, end in itertools.pairwise(cuts):
            owner = min((e for e in inside if e.time_range.start <= start
                         and end <= e.time_range.end),
                        key=lambda e: e.time_range.end - e.time_range.start)
            in_backward = backward.within(start, end)
            backward_row["host_us"] += in_backward
            row(_row_of_range(owner.name.removeprefix(RANGE_PREFIX), kinds))["host_us"] += (
                end - start - in_backward)

    per_call = [{"wall_us": call.time_range.end - call.time_range.start} for call in calls]
    if with_device:
        # The profiler has already attached each GPU activity to the operator that launched
        # it (matching correlation ids) as that operator's ``kernels``.
        for launcher in events:
            if (launcher.device_type != DeviceType.CPU or launcher.is_async
                    or launcher.name.startswith(RANGE_PREFIX)):
                continue
            # A range's GPU-side annotation mirrors it under the same name: not an activity.
            launched = [k for k in launcher.kernels if k.name != launcher.name]
            owner = _owner_of_activity(launcher) if launched else UNATTRIBUTED
            if owner == UNATTRIBUTED:
                continue
            target = row(owner if owner == BACKWARD else _row_of_range(owner, kinds))
            target["device_us"] += sum(k.duration for k in launched)
            target["kernels"] += sum(_is_kernel(k.name) for k in launched)
        activities = [e for e in events if is_device_activity(e)]
        for numbers, call in zip(per_call, calls):
            numbers.update(device_in_window(activities, call.time_range.start,
                                            call.time_range.end))
        # Whatever the calls ran that no range owns (no linked operator, or one outside
        # every range) is reported, not dropped.
        residual_us = (sum(c["activity_us"] for c in per_call)
                       - sum(r["device_us"] for r in rows.values()))
        residual_kernels = (sum(c["kernels"] for c in per_call)
                            - sum(r["kernels"] for r in rows.values()))
        if residual_us > 0 or residual_kernels > 0:
            unattributed = row(UNATTRIBUTED)
            unattributed["device_us"] = max(residual_us, 0.0)
            unattributed["kernels"] = max(residual_kernels, 0)
    return {"rows": rows, "calls": per_call}


def _owner_of_activity(launcher) -> str:
    """The innermost range around a GPU activity's launching operator (or backward)."""
    event = launcher
    while event is not None:
        if event.name.startswith(_BACKWARD_EVENT_PREFIX):
            return BACKWARD
        if event.name.startswith(RANGE_PREFIX):
            return event.name.removeprefix(RANGE_PREFIX)
        event = event.cpu_parent
    return UNATTRIBUTED


def device_in_window(activities, start: float, end: float) -> dict:
    """Busy time (union of activity intervals, clipped), summed activity time and kernel
    count of the activities starting in a window."""
    clipped = [(max(a.time_range.start, start), min(a.time_range.end, end)) for a in activities
               if a.time_range.end > start and a.time_range.start < end]
    starting = [a for a in activities if start <= a.time_range.start < end]
    return {"device_us": sum(e - s for s, e in merge_intervals(clipped)),
            "activity_us": sum(a.time_range.end - a.time_range.start for a in starting),
            "kernels": sum(_is_kernel(a.name) for a in starting)}


def top_kernels(activities, n_calls: int, count: int = 15) -> list[dict]:
    """The ``count`` kernels (by name) with the most device time per call."""
    totals: dict[str, list[float]] = {}
    for activity in activities:
        if _is_kernel(activity.name):
            entry = totals.setdefault(activity.name, [0.0, 0])
            entry[0] += activity.time_range.end - activity.time_range.start
            entry[1] += 1
    ranked = sorted(totals.items(), key=lambda item: -item[1][0])[:count]
    return [{"kernel": name[:160], "device_ms_per_call": us / n_calls / 1e3,
             "launches_per_call": launches / n_calls} for name, (us, launches) in ranked]
