"""Counting what a step dispatches: top-level aten ops (those not called by another aten op), forward, backward
and optimizer together, as torch.profiler records them on the CPU."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def aten_ops(function) -> int:
    """Top-level aten ops dispatched by one call of `function` (autograd's backward ops included)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        function()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count
