"""The GPU benchmark scripts' CPU parts: sample generation, summaries, comparisons and plots."""

import importlib.util
import shutil
import json

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


def test_combining_side_by_side_jobs_gives_speedups_and_agreement(one_rank, tmp_path):
    scaling = load("scaling")
    report = json.loads((one_rank / "run_report.json").read_text())
    meta = {"gpu": "test", "commit": "x"}
    for n, wall, name in ((1, 12.0, "a"), (2, 7.0, "b")):
        res = {"wall": wall, "report": report, "out_dir": str(one_rank)}
        rec = scaling.summarize(n, "contigs500", res, None, {}, meta)
        folder = tmp_path / name
        folder.mkdir()
        (folder / "scaling_summary.json").write_text(json.dumps([rec]))
        (folder / "scaling_raw.json").write_text(json.dumps({f"contigs500_{n}": res}))
    records = scaling.combine([tmp_path / "b", tmp_path / "a"], tmp_path / "all")
    assert [r["gpus"] for r in records] == [1, 2]
    assert records[1]["e2e_speedup_vs_1"] == pytest.approx(12 / 7)
    assert records[1]["min_cosine_vs_1gpu"] == pytest.approx(1.0) and records[1]["labels_identical_vs_1gpu"]
    assert 0 < records[1]["non_gpu_stage_fraction"] < 1 and records[1]["setup_seconds"] > 0
    assert (tmp_path / "all" / "scaling.png").stat().st_size > 10_000


def test_runs_on_different_machines_are_compared_through_their_agreement_samples(one_rank, tmp_path):
    """The one-GPU and four-GPU outputs left on two machines: combine compares the small samples
    each run left beside its summary, and a changed label or feature shows."""
    import h5py
    import numpy as np

    scaling = load("scaling")
    report = json.loads((one_rank / "run_report.json").read_text())
    meta = {"gpu": "test", "commit": "x"}
    for n, name in ((1, "a"), (4, "b")):
        res = {"wall": 10.0 / n, "report": report, "out_dir": str(tmp_path / "gone" / name)}
        rec = scaling.summarize(n, "contigs500", res, None, {}, meta)
        folder = tmp_path / name
        folder.mkdir()
        (folder / "scaling_summary.json").write_text(json.dumps([rec]))
        (folder / "scaling_raw.json").write_text(json.dumps({f"contigs500_{n}": res}))
        scaling.write_agreement_sample(one_rank, folder / scaling.agreement_sample_name(rec), stride=1)
    same = scaling.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "all")[1]
    assert same["min_cosine_vs_1gpu"] == pytest.approx(1.0) and same["labels_identical_vs_1gpu"]

    changed = tmp_path / "changed"
    shutil.copytree(one_rank, changed)
    with h5py.File(changed / "embeddings.h5", "r+") as f:
        f["esm2"][0] = -f["esm2"][0]
    lines = (changed / "prediction_results.txt").read_text().splitlines()
    cells = lines[1].split("\t")
    cells[1] = "virus" if cells[1] != "virus" else "non-virus"
    (changed / "prediction_results.txt").write_text("\n".join([lines[0], "\t".join(cells), *lines[2:]]) + "\n")
    scaling.write_agreement_sample(changed, tmp_path / "b" / "agreement_contigs500_4.npz", stride=1)
    differs = scaling.combine([tmp_path / "a", tmp_path / "b"], tmp_path / "all")[1]
    assert differs["min_cosine_vs_1gpu"] < 0.9999 and not differs["labels_identical_vs_1gpu"]
    assert np.load(tmp_path / "b" / "agreement_contigs500_4.npz")["features"].dtype == np.float32
