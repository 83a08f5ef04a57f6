"""A bounded cache of inner chunks' stored bytes, shared by readers: what one read fetched and
checked serves the next read of the same chunk, from any thread (a server's trainers), without a
request to storage; and what one read is fetching, a read that misses the same chunks meanwhile
waits for instead of fetching again ("single flight")."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from nearstore.checks import check_integer

ChunkKey = tuple[str, int, int]  # where a chunk's bytes are stored: (shard object path, offset, bytes)


class ChunkCache:
    """Inner chunks' stored bytes, by where they are stored, within `budget` bytes: the least
    recently used leave first. Readers put only chunks that passed their checks (`SelectiveReader`),
    and check what they get as they check a fresh read's bytes.

    budget: bytes of chunks held at most (Python's bookkeeping, some 200 bytes a chunk, beside).
    `nbytes` is what is held now; `hits` and `misses` count chunks asked for (a chunk waited for
    is a miss, then a hit when it is taken).

    Readers that miss the same chunks at once fetch each once: a read `claim`s the chunks it
    misses, fetches those it was given, waits for the others' fetches, takes what they put, and
    `release`s its claims once it has put what passed its checks (or failed). A read claims in two
    calls, the shard indexes it lacks (keys no chunk has) and then its chunks, and after each waits
    only on claims of that kind made before its own; a read waiting for chunks never waits for an
    index: no reads wait on each other in a ring."""

    def __init__(self, budget: int) -> None:
        self.budget = check_integer("budget", budget, 1)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[ChunkKey, bytes] = OrderedDict()
        self._fetching: dict[ChunkKey, threading.Event] = {}  # claimed chunks, set once released
        self._lock = threading.Lock()

    def get(self, keys: Sequence[ChunkKey]) -> list[bytes | None]:
        """Each chunk's bytes, None where not held; those found become the most recently used."""
        with self._lock:
            found = [self._chunks.get(key) for key in keys]
            for key, blob in zip(keys, found):
                if blob is not None:
                    self._chunks.move_to_end(key)
            hits = sum(blob is not None for blob in found)
            self.hits += hits
            self.misses += len(keys) - hits
        return found

    def put(self, chunks: Iterable[tuple[ChunkKey, bytes]]) -> None:
        """Hold these chunks as the most recently used, then drop the least recently used until
        `budget` holds (a chunk larger than the budget is never held)."""
        with self._lock:
            for key, blob in chunks:
                if len(blob) > self.budget:
                    continue
                held = self._chunks.pop(key, None)
                self.nbytes += len(blob) - (0 if held is None else len(held))
                self._chunks[key] = blob
            while self.nbytes > self.budget:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= len(dropped)

    def claim(self, keys: Sequence[ChunkKey]) -> tuple[list[bool], list[threading.Event]]:
        """Claim for the caller's fetch those of `keys` neither held nor claimed by another read:
        whether each is now the caller's, and the fetches to wait for before taking the others
        from the cache (a chunk that no fetch put, failed or dropped, the caller fetches itself).
        Every key claimed must be `release`d, whatever becomes of the fetch."""
        fetch = threading.Event()  # set when the caller releases its claims
        with self._lock:
            ours = [key not in self._chunks and key not in self._fetching for key in keys]
            others = {self._fetching[key] for key, mine in zip(keys, ours) if not mine and key in self._fetching}
            self._fetching.update((key, fetch) for key, mine in zip(keys, ours) if mine)
        return ours, list(others)

    def release(self, keys: Iterable[ChunkKey]) -> None:
        """End the caller's claims on `keys`: the reads waiting for them go on."""
        with self._lock:
            fetches = {self._fetching.pop(key) for key in keys}
        for fetch in fetches:
            fetch.set()

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {
                "budget": self.budget,
                "bytes": self.nbytes,
                "chunks": len(self._chunks),
                "hits": self.hits,
                "misses": self.misses,
            }
