import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, on CPU-only machines)")
    config.addinivalue_line("markers", "slow: starts the DeepSpeed launcher or several processes")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: none on this machine (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden() -> Path:
    return GOLDEN


def read_records(path):
    from virnuc_ds.fasta import read_fasta

    return [(r.id, r.sequence) for r in read_fasta(path, check_duplicates=False)]


# Two cores are shared by the test process and the launcher's ranks: one thread each keeps
# in-process model tests from oversubscribing the machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch as _torch

    _torch.set_num_threads(1)
except Exception:  # pragma: no cover
    pass
