"""PyTorch's intra-op thread count for a block of work: float sums (training, learned rounding) may
differ between thread counts, so work whose result must be reproducible fixes it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with exactly `count` PyTorch intra-op threads, then restore the caller's count."""
    if count < 1:
        raise ValueError(f"thread count must be at least 1, got {count}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
