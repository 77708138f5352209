"""Shared test setup: everything runs offline, on one CPU thread.

Tiny models gain nothing from intra-op threads, and one thread keeps results
independent of the machine's core count (SOAP's eigendecompositions amplify
reduction-order differences) and avoids oversubscribing a shared machine.
"""

import logging
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _package_log_propagates():
    """A program's ``show_package_log`` stops the package's records propagating to the root
    logger; restore that after each test, so that ``caplog`` sees them in the next one."""
    yield
    logging.getLogger("fedpac_hf").propagate = True
