"""Shared fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny meta-training populations: one thread is as fast, and immune to a busy machine (two
    multi-threaded jobs on two cores slow each other by an order of magnitude)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)  # MetaTrainer turned it on; leave later tests as found
