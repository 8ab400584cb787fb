"""Never lose GPU work: kill -9, SIGTERM, failing records, a dying rank, hostile input."""

import gzip
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT, SAMPLE, cosine_rows
from virnuc_ds.config import config_from_dict
from virnuc_ds.errors import ConfigError, InputError
from virnuc_ds.fasta import read_fasta
from virnuc_ds.pipeline.parts import PARTS_DIR
from virnuc_ds.store.embeddings import read_embeddings


def run_rank(demo, out, env_extra, *extra, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    cmd = [sys.executable, "-m", "virnuc_ds.run", "-c", str(demo["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_same_results(a: Path, b: Path):
    ea, eb = read_embeddings(a / "embeddings.h5"), read_embeddings(b / "embeddings.h5")
    assert ea.ids == eb.ids
    np.testing.assert_array_equal(ea.features(), eb.features())
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def n_parts(out: Path) -> int:
    return len(list((out / PARTS_DIR).glob("part-*.h5")))


def all_part_files_readable(out: Path):
    for p in (out / PARTS_DIR).glob("*.h5"):
        with h5py.File(p, "r") as f:
            assert f["esm2"].shape[0] == f["frame_index"].shape[0]


def test_kill_9_mid_run_then_rerun_gives_identical_outputs(demo, one_rank, tmp_path):
    out = tmp_path / "killed"
    proc = run_rank(demo, out, {"VIRNUC_DS_TEST_KILL_AFTER_PARTS": "1"})
    assert proc.returncode == -signal.SIGKILL
    assert len(list((out / PARTS_DIR).glob("part-*.h5"))) == 1  # the finished part survived
    assert not (out / "embeddings.h5").exists()
    all_part_files_readable(out)
    proc = run_rank(demo, out, {})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # every part but the finished one is computed: nothing finished is computed again
    assert f"{n_parts(one_rank) - 1} to compute" in proc.stderr
    assert_same_results(one_rank, out)
    assert not list(out.rglob(".*.tmp"))  # a killed write's temporary is swept by the rerun


def test_sigterm_keeps_finished_parts_exits_3_and_resumes(demo, one_rank, tmp_path):
    out = tmp_path / "term"
    proc = run_rank(demo, out, {"VIRNUC_DS_TEST_SIGTERM_AFTER_PARTS": "1"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "stopped by SIGTERM" in proc.stderr and "rerun the same command to resume" in proc.stderr
    assert len(list((out / PARTS_DIR).glob("part-*.h5"))) == 1
    proc = run_rank(demo, out, {})
    assert proc.returncode == 0 and f"{n_parts(one_rank) - 1} to compute" in proc.stderr
    assert_same_results(one_rank, out)


def test_ctrl_c_reaching_every_process_stops_the_run_with_exit_3_and_no_traceback(demo, one_rank, tmp_path):
    # a terminal's Ctrl-C goes to the whole foreground group: the rank, prepare's process and its pool.
    # Prepare sends it (a test hook) to its own group, here a session of its own; the helpers ignore
    # it, prepare finishes, and the rank stops before its first part.
    out = tmp_path / "ctrl_c"
    env = dict(os.environ, PYTHONPATH=str(ROOT), VIRNUC_DS_TEST_SIGNAL_GROUP_IN_PREPARE="INT")
    cmd = [sys.executable, "-m", "virnuc_ds.run", "-c", str(demo["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "stopped by SIGINT" in proc.stderr
    assert n_parts(out) == 0 and not (out / "embeddings.h5").exists()
    proc = run_rank(demo, out, {})
    assert proc.returncode == 0 and "prepare: reusing" in proc.stderr, proc.stderr[-2000:]
    assert_same_results(one_rank, out)


def test_a_failing_record_is_listed_exit_2_and_rerun_retries_only_it(demo, one_rank, tmp_path):
    ids = read_embeddings(one_rank / "embeddings.h5").ids
    victim = ids[3]
    out = tmp_path / "partial"
    proc = run_rank(demo, out, {"VIRNUC_DS_FAIL_FRAMES": victim})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = (out / "failed_files.txt").read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{victim}|esm2|InjectedFault")
    partial = read_embeddings(out / "embeddings.h5")
    assert partial.ids == [i for i in ids if i != victim]  # the rest completed
    assert victim not in (out / "prediction_results.txt").read_text()
    proc = run_rank(demo, out, {})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 to compute" in proc.stderr
    assert not (out / "failed_files.txt").exists()
    # the retried frame ran in a batch of its own: equal within the batching gate, labels identical
    ref, got = read_embeddings(one_rank / "embeddings.h5"), read_embeddings(out / "embeddings.h5")
    assert got.ids == ref.ids and cosine_rows(ref.features(), got.features()).min() >= 0.99999
    labels = lambda p: [r.split("\t")[:2] for r in (p / "prediction_results.txt").read_text().splitlines()]
    assert labels(out) == labels(one_rank)


@pytest.mark.slow
def test_a_dying_rank_makes_the_launcher_exit_non_zero_without_hanging(demo, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), VIRNUC_DS_TEST_KILL_AFTER_PARTS="1", VIRNUC_DS_TEST_HOOK_RANK="1")
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29741", "--module",
        "virnuc_ds.run", "-c", str(demo["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "exits with return code = -9" in proc.stdout + proc.stderr


def test_long_proteins_are_truncated_and_counted(demo, tmp_path):
    import json

    import yaml

    cfg = yaml.safe_load(Path(demo["config"]).read_text())
    cfg["esm2"]["max_residues"] = 60
    for key, value in cfg["models"].items():
        cfg["models"][key] = str(Path(demo["config"]).parent / value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "o"
    from virnuc_ds.cli import main

    assert main(["run", "-c", str(tmp_path / "c.yaml"), "-i", str(SAMPLE), "-m", "500", "-o", str(out)]) == 0
    proteins = [r.sequence for r in read_fasta(out / "prep" / "identified_protein.faa")]
    report = json.loads((out / "run_report.json").read_text())
    assert report["ranks"][0]["truncated_proteins"] == sum(len(p) > 60 for p in proteins) > 0


# ---------------------------------------------------------------- hostile input


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_fasta_reader_fuzz_never_crashes(tmp_path, blob):
    path = tmp_path / "fuzz.fa"
    path.write_bytes(blob)
    try:
        for rec in read_fasta(path, check_nucleotides=True):
            assert rec.id and rec.sequence
    except InputError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["esm2", "run", "models", "dtype", "toks_per_batch", "x"]), c, max_size=3), max_leaves=8))
def test_config_loader_fuzz_raises_only_config_errors(data):
    try:
        config_from_dict(data if isinstance(data, dict) else {"esm2": data})
    except ConfigError as exc:
        assert "\n" not in str(exc)


def test_awkward_headers_and_sequences(tmp_path):
    long_name = "x" * 5000
    text = (
        f">{long_name} very long\r\nACGTNNNNNNNNNNACGT\r\n"
        ">a/b:c|d desc\nacgtacgtaaa\n"
        ">runs_of_N\n" + "N" * 900 + "\n"
    )
    path = tmp_path / "weird.fa.gz"
    with gzip.open(path, "wt") as fh:
        fh.write(text)
    recs = list(read_fasta(path, check_nucleotides=True))
    assert [r.id for r in recs] == [long_name, "a/b:c|d", "runs_of_N"]
    assert recs[1].sequence == "acgtacgtaaa"
    from virnuc_ds.prep.prepare import prepare

    stats = prepare(path, 300, tmp_path / "o", workers=1)
    assert stats.chunks == 1 + 1 + 3


def test_a_million_records_stream_in_bounded_memory(tmp_path):
    path = tmp_path / "million.fa"
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)
    seqs = letters[rng.integers(0, 4, size=(1_000_000, 24))]
    with open(path, "wb") as fh:
        for k in range(0, 1_000_000, 100_000):
            block = seqs[k : k + 100_000]
            fh.write(b"".join(b">r%d\n%s\n" % (k + i, row.tobytes()) for i, row in enumerate(block)))
    # VmHWM (peak resident memory of this process image); ru_maxrss would include the forked parent
    code = (
        "from virnuc_ds.prep.prepare import prepare; "
        f"s = prepare({str(path)!r}, 300, {str(tmp_path / 'o')!r}, workers=1); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print(s.records, hwm)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records, peak_kib = map(int, proc.stdout.split())
    assert records == 1_000_000
    # the input is 32 MB and the outputs larger; the process holds one block, not the sample
    assert peak_kib < 150 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
