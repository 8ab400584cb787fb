"""The GPU benchmark scripts' CPU parts: sample generation, summaries, comparisons and plots."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import ROOT


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload, min_frames_per_chunk", [("contigs500", 0.9), ("reads150", 1.0)])
def test_generated_samples_are_coding_rich(tmp_path, workload, min_frames_per_chunk):
    from virnuc_ds.prep.prepare import prepare

    scaling = load("scaling")
    path = tmp_path / "s.fa"
    scaling.write_sample(path, workload, 30_000)
    stats = prepare(path, scaling.WORKLOADS[workload][0], tmp_path / "o", workers=1)
    assert stats.frames >= min_frames_per_chunk * stats.chunks


def test_summary_comparison_and_plot_from_real_run_folders(one_rank, tmp_path):
    scaling = load("scaling")
    report = json.loads((one_rank / "run_report.json").read_text())
    res = {"wall": 10.0, "report": report}
    meta = {"gpu": "test", "commit": "x"}
    base = scaling.summarize(1, "contigs500", res, None, {}, meta)
    two = scaling.summarize(2, "contigs500", dict(res, wall=6.0), base, scaling.compare(one_rank, one_rank), meta)
    assert two["e2e_speedup_vs_1"] == pytest.approx(10 / 6)
    assert two["min_cosine_vs_1gpu"] == pytest.approx(1.0) and two["labels_identical_vs_1gpu"]
    for key in ("gpus", "workload", "esm2_tokens_per_s", "e2e_seconds", "esm2_seconds", "prepare_seconds", "gpu", "commit"):
        assert key in two
    scaling.plot([base, two], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 10_000
