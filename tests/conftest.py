import os
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parents[1]
SAMPLE = ROOT / "examples" / "sample.fa"
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
        if item.get_closest_marker("gpu") is not None:
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


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The tiny demo models (real formats, random weights) and their demo.yaml."""
    from virnuc_ds.demo import write_demo_models

    return write_demo_models(tmp_path_factory.mktemp("demo"))


def run_cli(demo, out, *extra, input_path=SAMPLE):
    from virnuc_ds.cli import main

    return main(["run", "-c", str(demo["config"]), "-i", str(input_path), "-m", "500", "-o", str(out), *extra])


@pytest.fixture(scope="session")
def one_rank(demo, tmp_path_factory):
    """An uninterrupted one-rank run of the sample: the reference other runs must equal."""
    out = tmp_path_factory.mktemp("one_rank")
    assert run_cli(demo, out) == 0
    return out


def cosine_rows(a, b):
    import numpy as np

    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
