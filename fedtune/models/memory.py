"""Peak resident memory of a call, for memory benchmarks and tests (Linux /proc)."""

from __future__ import annotations

from collections.abc import Callable


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, …)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def extra_peak(fn: Callable[[], object], repeats: int = 3) -> int:
    """Bytes of RSS high-water above the RSS at call time; min over `repeats` (noise only adds)."""
    out = []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = status("VmRSS")
        fn()
        out.append(status("VmHWM") - base)
    return min(out)
