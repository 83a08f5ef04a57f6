from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def device(request) -> str:
    """Every kernel test that takes `device` runs on the CPU, and on CUDA where there is one."""
    return request.param


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run a test on one torch thread. Shrinks, solves and small reductions are hundreds of tiny
    LAPACK and BLAS calls: on a shared 2-core machine two threads wait on each other whenever
    another process runs (measured: eigh of 128 × 128 from 2 ms to 900 ms), and these tests would
    take minutes instead of seconds; one thread computes the same thing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
