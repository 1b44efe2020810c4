"""Memory, measured one way everywhere: the process's peak resident set (what a client reports each round, and what
the benchmarks compare), torch's CUDA peak, and the peak of one call (VmHWM reset through /proc, for memory
benchmarks and tests)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch


def peak_rss_mb() -> float:
    """The process's peak resident set size so far, in MiB (getrusage ru_maxrss)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def peak_memory_mb(device: torch.device | None = None) -> dict[str, float]:
    """{"mem_peak_mb": the process's peak RSS, "cuda_mem_peak_mb": torch.cuda.max_memory_allocated (on CUDA)}."""
    out = {"mem_peak_mb": peak_rss_mb()}
    if device is not None and device.type == "cuda":
        out["cuda_mem_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / (1 << 20), 1)
    return out


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
