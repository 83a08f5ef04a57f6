"""Trainer-side loading: the StreamingLoader and its DALI pipeline."""

from loaders.streaming_loader import StreamingLoader

__all__ = ["StreamingLoader"]
