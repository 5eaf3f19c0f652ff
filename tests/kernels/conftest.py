"""Kernel tests run the Triton kernels on CPU under ``TRITON_INTERPRET=1`` where no CUDA device exists (CI; the root
conftest sets it before anything imports triton), and on the GPU (``-m gpu``, the GPU queue's speed entry) where one
does."""

from __future__ import annotations

import pytest
import torch

# Triton is a Linux dev dependency; elsewhere these tests have nothing to run.
pytest.importorskip("triton")

# The kernels' devices: the interpreter on CPU where there is no GPU, the GPU (marked, so `-m gpu` selects it) where
# there is one. Interpreted CPU runs next to a real GPU are skipped: TRITON_INTERPRET is off there.
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: run on cuda")),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
