"""nearstore's errors: one small family, each also the builtin it refines, so `except ValueError`
(or `IndexError`) still catches them, and `except NearstoreError` catches every refusal of ours.

A server sends the class's name with the message (`nearstore.serving.protocol`); its client raises
the same class again, so an error reads the same in process and across the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class NearstoreError(Exception):
    """Something nearstore refuses, with a message that names what is wrong and where."""


class ParameterError(NearstoreError, ValueError):
    """An argument or option out of its domain: `keep must be in (0, 1], got 1.5`."""


class DatasetError(NearstoreError, ValueError):
    """A store, an input file, a selection or a state that is not what it must be: not a nearstore
    dataset, an array missing, made for another dataset."""


class SampleIdError(NearstoreError, IndexError):
    """Sample ids that name no sample of the dataset, or name one twice where each must be once."""


class SampleError(NearstoreError, ValueError):
    """A stored sample that cannot be used: an encoded image damaged (cut short, not an image) or
    that its decoder refuses. The message names the sample id, its array and its shard; `ids`
    has the ids where they are known."""

    def __init__(self, message: str, ids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ids = ids


class IntegrityError(DatasetError):
    """Stored bytes that are not what was written: a shard object missing, empty, cut short or
    changed, a checksum that does not match. The message names the dataset, the array, the shard
    object and the sample ids it holds; `ids` has those ids where they are known."""

    def __init__(self, message: str, ids: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.ids = ids


class RequestError(NearstoreError, ValueError):
    """A request a server refuses: malformed, too large, or for a round it does not hold."""


class StorageError(NearstoreError, OSError):
    """A server's storage failed a read after its retries (unreachable, refusing): what the
    server says to a trainer in place of an unnamed internal error, an OSError as the store's own
    failure is in process."""


class RoundCancelled(NearstoreError):
    """A selection round stopped before its end, nothing of it kept: nobody waits for it any more
    (its select's caller gave up or went away, and no retry of that select waits for it)."""


ERRORS: dict[str, type[NearstoreError]] = {
    cls.__name__: cls
    for cls in (
        NearstoreError,
        ParameterError,
        DatasetError,
        SampleIdError,
        SampleError,
        IntegrityError,
        RequestError,
        StorageError,
        RoundCancelled,
    )
}


# The packages behind fsspec's stores, whose errors (botocore's NoCredentialsError, aiohttp's
# ClientResponseError, ...) are not OSErrors: a missing credential is the user's to fix, not a bug.
STORAGE_MODULES = frozenset({"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "azure"})


def storage_error(e: BaseException) -> bool:
    """Whether `e` is a storage backend's own error (credentials, a bucket, a refused request)."""
    return type(e).__module__.split(".")[0] in STORAGE_MODULES


@contextmanager
def naming_file(path: str) -> Iterator[None]:
    """An OSError of a write, which names no file (a full disk's ENOSPC: "[Errno 28] No space left
    on device"), raised again naming `path`; one that names a file, or carries no errno (object
    storage's own), as it is."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e
        raise


def restated(error: Exception, message: str) -> Exception:
    """`error` said anew as `message` (where it happened), of its own class where that class takes
    a message alone; botocore's take keyword arguments only (building one raised KeyError), so an
    OSError for them, a NearstoreError for anything else."""
    try:
        return type(error)(message)
    except Exception:
        return OSError(message) if isinstance(error, OSError) else NearstoreError(message)
