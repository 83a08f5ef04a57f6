"""Trainer-side loading: the StreamingLoader and its DALI pipeline."""

from loaders.flight_client import FlightSource
from loaders.streaming_loader import StreamingLoader

__all__ = ["FlightSource", "StreamingLoader"]
