"""Peak resident memory of a block of work (Linux: VmHWM reset through /proc/self/clear_refs)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _field(name: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager: ``.peak_mb`` is the peak memory above the level at entry.

    On CUDA it reads the allocator's peak; on CPU the process's resident-set high-water mark,
    reset at entry (large tensors are mmapped, so freed memory leaves the resident set).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                _CLEAR.write_text("5")
            except OSError:
                self._start = None
                return self
            self._start = _field("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self._start is not None:
            peak = _field("VmHWM")
            self.peak_mb = None if peak is None else max(0, peak - self._start) / 2**20
