"""What a loader reads from: one `Source` contract, a module per kind, chosen by URL scheme
(`open_source`); nothing else in the loader asks which kind it has."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loaders.sources.base import Source
from loaders.sources.flight import FlightSource
from loaders.sources.group import ServerGroup
from loaders.sources.store import StoreSource
from nearstore import Dataset

# URL schemes with a source of their own; every other URL is a store (fsspec's).
SOURCES: dict[str, type[Source]] = {"grpc": FlightSource, "grpc+tls": FlightSource}


def open_source(
    source: str | Sequence[str] | Dataset | Source, *, storage_options: Mapping[str, Any] | None = None
) -> Source:
    """The source at a URL: a near-storage server for grpc://host:port/name or grpc+tls://...
    (storage_options: the FlightSource's options, e.g. token, tls_root_certs, on_disconnect), else
    a store by fsspec URL (local, s3://, http://, ...; storage_options: fsspec's). A list of
    server URLs is one dataset's shards served by several servers (`ServerGroup`, the same
    options for each). An opened Dataset is a store; a Source passes through."""
    if isinstance(source, Source):
        return source
    if isinstance(source, list | tuple):
        return ServerGroup(source, **dict(storage_options or {}))
    scheme = source.partition("://")[0] if isinstance(source, str) else None
    if scheme in SOURCES:
        return SOURCES[scheme](source, **dict(storage_options or {}))
    return StoreSource(source, storage_options=storage_options)


__all__ = ["SOURCES", "FlightSource", "ServerGroup", "Source", "StoreSource", "open_source"]
