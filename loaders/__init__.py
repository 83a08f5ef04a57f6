"""Beside the trainer (layer 4): the StreamingLoader, the sources it reads from, and its DALI pipeline."""

from loaders.mixture import Mixture
from loaders.sources import FlightSource, ServerGroup, Source, StoreSource, open_source
from loaders.streaming_loader import StreamingLoader

__all__ = ["FlightSource", "Mixture", "ServerGroup", "Source", "StoreSource", "StreamingLoader", "open_source"]
