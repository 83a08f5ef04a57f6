"""Serving (layer 3): the near-storage server and the wire protocol its client shares."""

from nearstore.serving.server import NearStoreServer

__all__ = ["NearStoreServer"]
