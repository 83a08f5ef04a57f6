"""Subnormal floats: flushed to zero before they reach the CPU's slow path."""

from __future__ import annotations

import torch


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """x with subnormal values set to 0.

    Values below the dtype's smallest normal number carry no information a sketch can use, and
    x86 CPUs compute with them ~100x slower: left in, a scan's shrinks went from 4 s to 145 s.
    """
    return x.masked_fill(x.abs() < torch.finfo(x.dtype).tiny, 0)
