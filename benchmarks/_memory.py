"""How much memory a piece of work adds, the same way in every benchmark."""

from __future__ import annotations

import os
import threading
import time

import torch


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_mb() -> float:
    """Memory held now: torch's allocation on a GPU, the resident set on the CPU."""
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else resident_mb()


def measuring_env(folder) -> dict[str, str]:
    """The environment for a child process that measures memory: this folder importable (``_memory``), and glibc
    serving every block over 128 KB by mmap, so freed memory leaves the resident set at once instead of staying in
    the allocator's free lists."""
    return {**os.environ, "PYTHONPATH": f"{folder}:{os.environ.get('PYTHONPATH', '')}",
            "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


class PeakMemory:
    """On a GPU: torch's peak allocation since :meth:`start`. On the CPU: the peak resident set, sampled by a
    thread every ``interval`` seconds (freed memory leaves the resident set, so a high-water mark alone would miss
    nothing but also include everything before). ``added`` is the peak minus the memory held at :meth:`start`."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self._sampling = False

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = held_mb()
            return
        self.baseline_mb = self.peak_mb = held_mb()
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def stop(self) -> dict[str, float]:
        """``{"peak_mb", "added_mb"}`` since :meth:`start`."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        self._sampling = False
        return {"peak_mb": self.peak_mb, "added_mb": self.peak_mb - self.baseline_mb}

    def _sample(self) -> None:
        while self._sampling:
            self.peak_mb = max(self.peak_mb, resident_mb())
            time.sleep(self.interval)
