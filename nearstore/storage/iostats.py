"""I/O accounting: bytes and requests counted where they cross a boundary."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class IOStats:
    """Bytes and requests read from storage (and the samples they carried)."""

    bytes: int = 0
    requests: int = 0
    samples: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, bytes: int = 0, requests: int = 0, samples: int = 0) -> None:
        with self._lock:
            self.bytes += bytes
            self.requests += requests
            self.samples += samples

    def snapshot(self) -> IOStats:
        with self._lock:
            return IOStats(self.bytes, self.requests, self.samples)

    def __sub__(self, other: IOStats) -> IOStats:
        return IOStats(self.bytes - other.bytes, self.requests - other.requests, self.samples - other.samples)

    def as_dict(self) -> dict[str, int]:
        return {"bytes": self.bytes, "requests": self.requests, "samples": self.samples}
