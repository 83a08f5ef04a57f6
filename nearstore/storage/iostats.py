"""I/O accounting: bytes and requests counted where they cross a boundary."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class IOStats:
    """Bytes and requests read from storage (and the samples they carried); `retries`: of the
    requests, those that asked again for a range that had come back short."""

    bytes: int = 0
    requests: int = 0
    samples: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, bytes: int = 0, requests: int = 0, samples: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.bytes += bytes
            self.requests += requests
            self.samples += samples
            self.retries += retries

    def snapshot(self) -> IOStats:
        with self._lock:
            return IOStats(self.bytes, self.requests, self.samples, self.retries)

    def __sub__(self, other: IOStats) -> IOStats:
        return IOStats(*(a - b for a, b in zip(self._counts(), other._counts())))

    def __add__(self, other: IOStats) -> IOStats:
        return IOStats(*(a + b for a, b in zip(self._counts(), other._counts())))

    def as_dict(self) -> dict[str, int]:
        return dict(zip(("bytes", "requests", "samples", "retries"), self._counts()))

    def _counts(self) -> tuple[int, int, int, int]:
        return self.bytes, self.requests, self.samples, self.retries
