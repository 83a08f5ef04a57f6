"""Faults to inject into real processes: importable by name, so Dask workers can load them."""

from __future__ import annotations

import os

from distributed import WorkerPlugin


class KillWorkerOnce(WorkerPlugin):
    """Kill the first worker that starts a task whose key begins with `prefix`, once: the marker
    file says it happened (and stops the restarted worker from dying again)."""

    def __init__(self, prefix: str, marker: str) -> None:
        self.prefix, self.marker = prefix, marker

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if finish == "executing" and str(name).startswith(self.prefix) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
