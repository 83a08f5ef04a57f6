from __future__ import annotations

import pytest
import torch


@pytest.fixture(
    params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
)
def device(request) -> str:
    """Every kernel test that takes `device` runs on the CPU, and on CUDA where there is one."""
    return request.param
