"""`virnuc-ds report`, `virnuc-ds plot` and the progress reporter, on one demo run (1 rank, in process)."""

import io
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from virnuc_ds.cli import main
from virnuc_ds.demo import write_demo_models
from virnuc_ds.plot import sequence_length_from_chunks, split_frame_id
from virnuc_ds.progress import ProgressReporter, read_statuses, status_path, summary_line
from virnuc_ds.report import summarize

ROOT = Path(__file__).parents[1]
SAMPLE = ROOT / "examples" / "sample.fa"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo pipeline once, through `predict` (the refactor's flags), on the CPU."""
    demo = write_demo_models(tmp_path_factory.mktemp("demo_models"))
    out = tmp_path_factory.mktemp("demo_run") / "out"
    assert main(["predict", str(SAMPLE), "-c", str(demo["config"]), "-o", str(out), "-d", "cpu"]) == 0
    return out


def copy_results(run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("run_report.json", "run_manifest.json", "prediction_results.txt", "prediction_results_highestscore.csv"):
        shutil.copy(run / name, dest / name)
    shutil.copytree(run / "prep", dest / "prep")
    return dest


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def test_report_prints_the_summary(demo_run, capsys):
    assert main(["report", str(demo_run)]) == 0
    text = capsys.readouterr().out
    report = json.loads((demo_run / "run_report.json").read_text())
    assert f"-> {report['frames']} frames (chunk length 500)" in text
    assert "40 sequences" in text and "86 chunks" in text
    assert "predictions: " in text and "of 86 chunks virus" in text
    for stage in ("prepare", "DNABERT-S", "ESM-2", "merge", "classify"):
        assert stage in text.split("stage times")[1].splitlines()[0]
    assert "rank 0: ESM-2 " in text and "tokens/s" in text
    assert "failures: none" in text and "versions: virnuc-ds " in text


def test_summarize_works_on_the_report_alone(demo_run):
    report = json.loads((demo_run / "run_report.json").read_text())
    text = summarize(report)
    assert text.startswith("virnuc-ds run report") and "tokens/s" in text and "predictions" not in text
    # a merge-only report (virnuc-ds merge) has no ranks and no stats
    assert "92 frames" in summarize({"frames": 92, "ranks": [], "merge_seconds": 0.1, "virnuc_ds_version": "x"})


def test_report_lists_failures(demo_run, tmp_path, capsys):
    out = copy_results(demo_run, tmp_path / "out")
    (out / "failed_files.txt").write_text("contig_9|esm2|CUDA out of memory\ncontig_12|dnabert_s|NaN in output\n")
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "failures: 2 (failed_files.txt)" in text
    assert "contig_9 [esm2]: CUDA out of memory" in text and "contig_12 [dnabert_s]: NaN in output" in text


def test_report_of_a_folder_without_results_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert "no run_report.json" in one_line_error(capsys)
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no such folder" in one_line_error(capsys)
    (tmp_path / "run_report.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 1
    assert "cannot be read as JSON" in one_line_error(capsys)


# ------------------------------------------------------------------------------------------------
# plot
# ------------------------------------------------------------------------------------------------


def colour_pixels(png: Path) -> tuple[int, int]:
    """(red pixels, blue pixels) of a PNG."""
    from matplotlib.image import imread

    rgb = imread(str(png))[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r > 0.7) & (g < 0.3) & (b < 0.3)
    blue = (b > 0.6) & (r < 0.3) & (g < 0.4)
    return int(red.sum()), int(blue.sum())


def test_plot_writes_the_figure_and_the_histogram(demo_run, tmp_path, capsys):
    from matplotlib.image import imread

    out = copy_results(demo_run, tmp_path / "out")
    assert main(["plot", str(out)]) == 0
    assert "(5 sequence(s))" in capsys.readouterr().out
    figure, histogram = out / "prediction.png", out / "score_histogram.png"
    for png in (figure, histogram):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    height, width = imread(str(figure)).shape[:2]
    assert width > 1000 and height > 5 * 150  # five panels
    labels = {line.split("\t")[1] for line in (out / "prediction_results.txt").read_text().splitlines()[1:]}
    red, blue = colour_pixels(figure)
    assert (red > 100) == ("virus" in labels) and (blue > 100) == ("others" in labels)
    assert not list(out.glob(".*.tmp"))


def test_plot_draws_virus_red_and_others_blue(demo_run, tmp_path):
    """The demo's random classifier may call everything one way: flip every other frame's call."""
    out = copy_results(demo_run, tmp_path / "out")
    results = out / "prediction_results.txt"
    lines = results.read_text().splitlines()
    flipped = [lines[0]]
    for k, line in enumerate(lines[1:]):
        fid, _, s1, s2 = line.split("\t")
        flipped.append("\t".join([fid, "virus" if k % 2 else "others", s1, s2]))
    results.write_text("\n".join(flipped) + "\n")
    assert main(["plot", str(out), "--sequences", "3"]) == 0
    for png in (out / "prediction.png", out / "score_histogram.png"):
        red, blue = colour_pixels(png)
        assert red > 100 and blue > 100, (png.name, red, blue)


def test_plot_errors_are_one_line(demo_run, tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "no prediction_results.txt" in one_line_error(capsys)
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "no such folder" in one_line_error(capsys)
    assert main(["plot", str(demo_run), "--sequences", "0"]) == 1
    assert "at least 1" in one_line_error(capsys)
    (tmp_path / "prediction_results.txt").write_text("Sequence_ID\tPrediction\tscore1\tscore2\nx_chunk_1F1\tvirus\n")
    assert main(["plot", str(tmp_path)]) == 1
    assert "expected 4" in one_line_error(capsys)


def test_chunk_positions_follow_the_originals_schedule():
    assert split_frame_id("contig_7_chunk_3F2") == ("contig_7", 3)
    assert split_frame_id("a_chunk_b_chunk_12R1") == ("a_chunk_b", 12)
    # the quirks of DESIGN.md: n=1001 -> 500, 500, 335; n=501 -> 500, 251; n=2300 -> 500 x 4, 464
    assert sequence_length_from_chunks([500, 500, 335], 500) == 1001
    assert sequence_length_from_chunks([500, 251], 500) == 501
    assert sequence_length_from_chunks([500] * 4 + [464], 500) == 2300
    assert sequence_length_from_chunks([120], 300) == 120


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_files_and_plain_log_lines(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("VIRNUC_DS_PROGRESS", raising=False)
    caplog.set_level(logging.INFO, logger="virnuc_ds.progress")
    other = ProgressReporter(tmp_path, 1, 2, total_frames=50, total_parts=1)  # rank 1: a file, no view
    assert other.mode == "off" and other._thread is None
    main_rank = ProgressReporter(tmp_path, 0, 2, total_frames=300, total_parts=3, interval=0.05, stream=io.StringIO())
    assert main_rank.mode == "plain"
    main_rank.part_done(frames=100, tokens=12_000, seconds=2.0)
    other.part_done(frames=50, tokens=5_000, seconds=1.0)
    status = json.loads(status_path(tmp_path, 0).read_text())
    assert status["frames_done"] == 100 and status["parts_done"] == 1 and status["tokens_per_s"] == 6000
    assert status["eta_seconds"] == pytest.approx(4.0) and status["state"] == "running"
    deadline = time.time() + 5
    while "150/350 frames" not in caplog.text and time.time() < deadline:
        time.sleep(0.02)
    assert "progress: 150/350 frames (42.9%), 11,000 tokens/s" in caplog.text
    other.close()
    main_rank.close()
    assert not main_rank._thread.is_alive()
    assert [s["state"] for s in read_statuses(tmp_path, 2)] == ["stopped", "done"]  # rank 0 did 100 of 300
    assert "ranks finished 2/2" in caplog.records[-1].getMessage()


def test_progress_live_view_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("VIRNUC_DS_PROGRESS", raising=False)
    terminal = FakeTerminal()
    reporter = ProgressReporter(tmp_path, 0, 2, total_frames=10, total_parts=1, stream=terminal)
    assert reporter.mode == "live"
    reporter.part_done(frames=10, tokens=1_000, seconds=0.5)
    reporter.close()
    shown = terminal.getvalue()
    for text in ("rank", "frames done", "tokens/s", "ETA", "GPU mem peak", "2,000", "10/10", "waiting"):
        assert text in shown, text
    assert not reporter._thread.is_alive()


def test_progress_can_be_plain_or_off_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRNUC_DS_PROGRESS", "off")
    assert ProgressReporter(tmp_path, 0, 1, 1, 1, stream=FakeTerminal()).mode == "off"
    monkeypatch.setenv("VIRNUC_DS_PROGRESS", "plain")
    reporter = ProgressReporter(tmp_path, 0, 1, 1, 1, stream=FakeTerminal())
    assert reporter.mode == "plain"
    reporter.close()


def test_summary_line_with_ranks_not_reporting_yet():
    line = summary_line([None, None])
    assert "0/0 frames" in line and "2 rank(s) not reporting yet" in line
    status = {"frames_done": 5, "frames_total": 10, "tokens_per_s": 100.0, "eta_seconds": 65.0, "state": "running",
              "gpu_max_memory_bytes": 3 * 2**30}
    line = summary_line([status, None])
    assert "5/10 frames (50.0%)" in line and "ETA 0:01:05" in line and "3.0 GiB" in line


def test_progress_updates_stay_off_the_disk_sync_path(tmp_path, monkeypatch):
    """A rank rewrites its status file after every part, on the GPU's path: atomically (never
    half-written) but without the two fsyncs (file and folder) a result file gets."""
    import os

    monkeypatch.setenv("VIRNUC_DS_PROGRESS", "off")
    reporter = ProgressReporter(tmp_path, 1, 2, total_frames=20, total_parts=2)
    syncs = []
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd))
    reporter.part_done(frames=10, tokens=1_000, seconds=1.0)
    reporter.part_done(frames=10, tokens=1_000, seconds=1.0)
    assert syncs == []
    assert json.loads(status_path(tmp_path, 1).read_text())["frames_done"] == 20
    assert not [p for p in tmp_path.rglob("*.tmp")]  # no temporary left behind
    reporter.close()
