import os

import pytest

# No network here: make Hugging Face fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    """Pin TVM's and torch's thread pools to the machine's cores for every test."""
    import torch

    from vitsparse.devices import set_num_threads

    threads = os.cpu_count() or 1
    set_num_threads(threads)
    torch.set_num_threads(threads)
