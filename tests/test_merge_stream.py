"""The merge: parts scattered into embeddings.h5 as they land (background process) or all at once,
with the same bytes either way; rewritten parts, failed frames and bad parts; the light entry module."""

import shutil
import subprocess
import sys
from collections.abc import Sequence

import h5py
import numpy as np
import pytest

from conftest import ROOT
from virnuc_ds.errors import IncompleteError
from virnuc_ds.pipeline.frames_table import read_frame_ids, read_prepared_fasta
from virnuc_ds.pipeline.merge import BackgroundMerge, MergeWriter, merge_parts
from virnuc_ds.pipeline.parts import PARTS_DIR, read_part, write_part
from virnuc_ds.store.embeddings import read_embeddings


def _results(folder):
    return {name: (folder / name).read_bytes() for name in ("prediction_results.txt", "prediction_results_highestscore.csv")}


def _classified_apart(embeddings, classifier, dest):
    """The result files `virnuc-ds classify` writes for an embeddings file: the path the golden files check."""
    from virnuc_ds.cli import main

    assert main(["classify", "-e", str(embeddings), "-p", str(classifier), "-o", str(dest), "--device", "cpu"]) == 0
    return _results(dest)


def _copy_without_results(one_rank, dest):
    shutil.copytree(one_rank, dest)
    for name in ("embeddings.h5", "prediction_results.txt", "prediction_results_highestscore.csv"):
        (dest / name).unlink()
    return dest


def test_background_and_serial_merge_write_the_same_results(demo, one_rank, tmp_path):
    """run.background_merge on (the default, one_rank) and off give identical files."""
    import yaml

    cfg = yaml.safe_load(demo["config"].read_text())
    cfg.setdefault("run", {})["background_merge"] = False
    serial_cfg = demo["config"].parent / "serial_merge.yaml"  # beside the demo models it names
    serial_cfg.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "serial"
    from virnuc_ds.cli import main

    assert main(["run", "-c", str(serial_cfg), "-i", str(ROOT / "examples" / "sample.fa"), "-m", "500", "-o", str(out)]) == 0
    a, b = read_embeddings(one_rank / "embeddings.h5"), read_embeddings(out / "embeddings.h5")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.dnabert_s, b.dnabert_s)
    np.testing.assert_array_equal(a.esm2, b.esm2)
    assert _results(one_rank) == _results(out)
    # the run classifies its features as `virnuc-ds classify` does (DNABERT-S first, then ESM-2)
    assert _results(one_rank) == _classified_apart(one_rank / "embeddings.h5", demo["classifier"], tmp_path / "apart")


def test_parts_merged_as_they_land_equal_a_merge_at_the_end(demo, one_rank, tmp_path):
    out = _copy_without_results(one_rank, tmp_path / "o")
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    held = tmp_path / "held"
    held.mkdir()
    for p in parts[1:]:
        shutil.move(p, held / p.name)
    fingerprint = read_part(parts[0])["fingerprint"]
    merger = BackgroundMerge(out, out / "prep", fingerprint, {}, str(demo["classifier"]), "cpu", threads=1)
    try:
        for p in parts[1:]:  # the other ranks' parts arrive later
            shutil.move(held / p.name, p)
        result = merger.finish()
    finally:
        merger.abandon()
    assert result["parts"] == len(parts) and result["frames"] == len(read_frame_ids(out / "prep"))
    a, b = read_embeddings(one_rank / "embeddings.h5"), read_embeddings(out / "embeddings.h5")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.features(), b.features())
    assert _results(one_rank) == _results(out)
    assert not list(out.glob(".*.tmp"))


def test_the_background_merge_s_own_error_reaches_rank_0(tmp_path):
    """The merge process fails and ends before rank 0 says stop: its error, waiting in the pipe, is
    what rank 0 reports (not "ended without a result", then the whole merge again in-process)."""
    from virnuc_ds.errors import VirnucError

    merger = BackgroundMerge(tmp_path / "o", tmp_path / "o" / "no_prep", "f", {}, None, "cpu", threads=1)
    merger.process.join()  # it failed at once: the prepared frames are not there
    with pytest.raises(VirnucError, match="merging the parts failed: .*no_prep"):
        merger.finish()


def test_a_part_rewritten_during_the_merge_replaces_its_rows(demo, one_rank, tmp_path):
    out = _copy_without_results(one_rank, tmp_path / "o")
    ids = read_frame_ids(out / "prep")
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    part = read_part(parts[0])
    writer = MergeWriter(out, ids, part["fingerprint"], {})
    writer.add_new_parts()
    # a rerun retries failed frames: the part is written again, with different values
    write_part(parts[0], 0, part["frame_index"], part["ids"], part["dnabert_s"] + 1, part["esm2"], part["fingerprint"])
    assert writer.add_new_parts() == 1
    writer.finish()
    emb = read_embeddings(out / "embeddings.h5")
    rows = [emb.ids.index(i) for i in part["ids"]]
    np.testing.assert_array_equal(emb.dnabert_s[rows], part["dnabert_s"] + 1)


def test_failed_frames_are_left_out_and_missing_ones_are_an_error(demo, one_rank, tmp_path):
    """Every frame of one sequence failed, and one frame of another: the sequence is in neither result
    file, and both files equal `virnuc-ds classify` on the embeddings of the frames that succeeded."""
    out = _copy_without_results(one_rank, tmp_path / "o")
    ids = read_frame_ids(out / "prep")
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    first = read_part(parts[0])
    whole = first["ids"][0][:-2]  # a sequence (Modified_ID) whose every frame fails
    gone = [i for i in ids if i[:-2] == whole] + [next(i for i in first["ids"] if i[:-2] != whole)]
    for path in parts:
        part = read_part(path)
        kept = np.array([i not in gone for i in part["ids"]])
        write_part(path, int(path.stem.split("-")[1]), part["frame_index"][kept], [i for i, k in zip(part["ids"], kept) if k],
                   part["dnabert_s"][kept], part["esm2"][kept], part["fingerprint"])
    with pytest.raises(IncompleteError, match=f"{len(gone)} of .* frames have no embeddings"):
        merge_parts(out, ids, fingerprint=first["fingerprint"])
    assert not (out / "embeddings.h5").exists() and not list(out.glob(".*.tmp"))
    merge_parts(out, ids, fingerprint=first["fingerprint"], failed_ids=frozenset(gone), classifier_path=str(demo["classifier"]))
    emb = read_embeddings(out / "embeddings.h5")
    full = read_embeddings(one_rank / "embeddings.h5")
    assert emb.ids == [i for i in ids if i not in gone]
    keep = [k for k, i in enumerate(full.ids) if i not in gone]
    np.testing.assert_array_equal(emb.features(), full.features()[keep])
    rows = (out / "prediction_results.txt").read_text().splitlines()[1:]
    assert [r.split("\t")[0] for r in rows] == emb.ids
    sequences = [r.split("\t")[0] for r in (out / "prediction_results_highestscore.csv").read_text().splitlines()[1:]]
    assert whole not in sequences and len(sequences) == len({i[:-2] for i in emb.ids})
    assert _results(out) == _classified_apart(out / "embeddings.h5", demo["classifier"], tmp_path / "apart")


def test_parts_slow_to_show_on_a_network_file_system_are_waited_for(demo, one_rank, tmp_path, monkeypatch):
    """A run of several nodes: a part another node renamed into place may not be listed on rank 0's node
    yet (NFS caches listings). The last scan looks again (here the part "shows" at the first look again,
    via the patched sleep) instead of calling its frames missing; without a wait they are."""
    from virnuc_ds.pipeline import merge

    out = _copy_without_results(one_rank, tmp_path / "o")
    ids = read_frame_ids(out / "prep")
    late = sorted((out / PARTS_DIR).glob("part-*.h5"))[-1]
    fingerprint = read_part(late)["fingerprint"]
    hidden = tmp_path / late.name
    shutil.move(late, hidden)
    with pytest.raises(IncompleteError, match="frames have no embeddings"):
        merge_parts(out, ids, fingerprint=fingerprint)  # a single node: no wait
    looks = []
    monkeypatch.setattr(merge.time, "sleep", lambda seconds: looks.append(seconds) or shutil.move(hidden, late))
    merge_parts(out, ids, fingerprint=fingerprint, classifier_path=str(demo["classifier"]), settle_seconds=90)
    assert looks == [merge.SETTLE_POLL_SECONDS]
    assert read_embeddings(out / "embeddings.h5").ids == read_embeddings(one_rank / "embeddings.h5").ids
    assert _results(one_rank) == _results(out)


def test_a_failure_list_slow_to_show_counts_its_frames_as_failed_not_missing(demo, one_rank, tmp_path, monkeypatch):
    from virnuc_ds.pipeline import merge
    from virnuc_ds.pipeline.parts import failures_path

    out = _copy_without_results(one_rank, tmp_path / "o")
    ids = read_frame_ids(out / "prep")
    first = sorted((out / PARTS_DIR).glob("part-*.h5"))[0]
    part = read_part(first)
    gone = part["ids"][:2]  # another node's frames that failed: its part holds the others, its list names them
    write_part(first, 0, part["frame_index"][2:], part["ids"][2:], part["dnabert_s"][2:], part["esm2"][2:], part["fingerprint"])
    late = tmp_path / "late.failed.txt"
    late.write_text("".join(f"{i}|esm2|RuntimeError: boom\n" for i in gone))
    monkeypatch.setattr(merge.time, "sleep", lambda seconds: shutil.move(late, failures_path(out, 0)))
    merge_parts(out, ids, fingerprint=part["fingerprint"], classifier_path=str(demo["classifier"]), settle_seconds=90)
    assert read_embeddings(out / "embeddings.h5").ids == [i for i in ids if i not in gone]


def test_a_part_with_nan_is_refused_naming_the_frame(demo, one_rank, tmp_path):
    out = _copy_without_results(one_rank, tmp_path / "o")
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    part = read_part(parts[0])
    part["esm2"][3, 0] = np.nan
    write_part(parts[0], 0, part["frame_index"], part["ids"], part["dnabert_s"], part["esm2"], part["fingerprint"])
    with pytest.raises(IncompleteError, match=part["ids"][3]):
        merge_parts(out, read_frame_ids(out / "prep"), fingerprint=part["fingerprint"])


def test_a_frame_in_two_parts_or_a_part_naming_other_frames_is_refused(demo, one_rank, tmp_path):
    """A part's ids must be the prepared frames at its frame indices, and each frame in one part only."""
    for case in ("duplicate", "ids"):
        out = _copy_without_results(one_rank, tmp_path / case)
        parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
        a, b = read_part(parts[0]), read_part(parts[1])
        if case == "duplicate":  # part 1 also holds part 0's first frame
            write_part(parts[1], 1, np.concatenate([b["frame_index"], a["frame_index"][:1]]), b["ids"] + a["ids"][:1],
                       np.concatenate([b["dnabert_s"], a["dnabert_s"][:1]]), np.concatenate([b["esm2"], a["esm2"][:1]]),
                       b["fingerprint"])
            expected = f"1 frames appear in several parts .*{a['ids'][0]}"
        else:  # two frames' ids swapped against their rows
            ids = [a["ids"][1], a["ids"][0]] + a["ids"][2:]
            write_part(parts[0], 0, a["frame_index"], ids, a["dnabert_s"], a["esm2"], a["fingerprint"])
            expected = "ids do not match the prepared frames"
        with pytest.raises(IncompleteError, match=expected):
            merge_parts(out, read_frame_ids(out / "prep"), fingerprint=a["fingerprint"])
        assert not (out / "embeddings.h5").exists()


def test_embeddings_file_is_plain_hdf5(one_rank):
    """Written through a memory map, read back by h5py with no special handling."""
    with h5py.File(one_rank / "embeddings.h5") as f:
        assert f["esm2"].dtype == np.float32 and f["esm2"].shape[0] == f["ids"].shape[0] == f["dnabert_s"].shape[0]
        assert f.attrs["format"] == "virnuc-ds embeddings"


def test_prepared_fasta_fast_reader_equals_the_general_reader(one_rank, tmp_path):
    from virnuc_ds.fasta import read_fasta

    path = one_rank / "prep" / "identified_protein.faa"
    ids, seqs = read_prepared_fasta(path)
    assert list(zip(ids, seqs)) == [(r.id, r.sequence) for r in read_fasta(path)]
    wrapped = tmp_path / "wrapped.faa"
    wrapped.write_text(">a desc\nMK\nLV\n>b\nQQ\n")  # not prepare's layout: the general reader
    assert read_prepared_fasta(wrapped) == (["a", "b"], ["MKLV", "QQ"])


def test_frames_table_is_memory_mapped_and_equals_the_general_reader(one_rank):
    from virnuc_ds.fasta import read_fasta
    from virnuc_ds.pipeline.frames_table import TwoLineFasta, read_frames_table

    prep = one_rank / "prep"
    table = read_frames_table(prep)
    assert isinstance(table.ids, Sequence) and not isinstance(table.ids, list)  # cut out on access
    prot = [(r.id, r.sequence) for r in read_fasta(prep / "identified_protein.faa")]
    nuc = [(r.id, r.sequence) for r in read_fasta(prep / "identified_nucleotide.fa")]
    assert list(table.ids) == [i for i, _ in prot] == [i for i, _ in nuc]
    assert list(table.proteins) == [s for _, s in prot] and list(table.nucleotides) == [s for _, s in nuc]
    assert table.protein_lengths().tolist() == [len(s) for _, s in prot]
    assert table.ids[-1] == prot[-1][0] and table.proteins[-2] == prot[-2][1]
    with pytest.raises(IndexError):
        table.ids[len(prot)]
    assert TwoLineFasta.index(prep / "identified_protein.faa") is not None


@pytest.mark.parametrize("text", [
    ">a\nMK\n>b\nQQ\n",          # prepare's layout
    ">a\nMK\n>b\nQQ",            # no newline at the end
    ">a\r\nMK\r\n>b\r\nQQ\r\n",  # Windows line ends
    ">a desc\nMK\n>b\nQQ\n",     # a description
    ">a\x0bb\nMK\n",              # other whitespace in an id
    ">a\nM\x0cK\n",              # ... or in a sequence
    ">\u00e9t\u00e9\nMK\n",      # a non-ASCII id
    ">a\nMK\nLV\n>b\nQQ\n",      # wrapped sequence lines
    ">a\n\n>b\nQQ\n",            # an empty sequence (an error)
    ">\nMK\n",                   # a header without an id (an error)
    "",                          # no records
])
def test_prepared_fasta_reader_equals_the_general_reader_on_any_layout(tmp_path, text):
    """What the general reader returns, or the same kind of error."""
    from virnuc_ds.errors import InputError
    from virnuc_ds.fasta import read_fasta

    path = tmp_path / "x.faa"
    path.write_bytes(text.encode())
    try:
        general = [(r.id, r.sequence) for r in read_fasta(path, allow_empty_file=True)]
    except InputError:
        with pytest.raises(InputError):
            read_prepared_fasta(path)
        return
    assert read_prepared_fasta(path) == ([i for i, _ in general], [s for _, s in general])


@pytest.mark.parametrize("check_ids", [True, False])
def test_frames_table_refuses_files_that_list_different_frames(tmp_path, check_ids):
    from virnuc_ds.errors import IncompleteError
    from virnuc_ds.pipeline.frames_table import read_frames_table

    (tmp_path / "identified_nucleotide.fa").write_text(">s_1F1\nATGAAA\n>s_1R1\nTTTCAT\n")
    (tmp_path / "identified_protein.faa").write_text(">s_1F1\nMK\n>s_1R2\nFH\n")  # same lengths, one id differs
    if check_ids:
        with pytest.raises(IncompleteError, match="list different frames"):
            read_frames_table(tmp_path)
    else:  # this run's own prepare wrote them: only the counts are compared
        assert len(read_frames_table(tmp_path, check_ids=False)) == 2
    (tmp_path / "identified_protein.faa").write_text(">s_1F1\nMK\n")
    with pytest.raises(IncompleteError, match="list different frames"):
        read_frames_table(tmp_path, check_ids=check_ids)


def test_the_entry_module_imports_no_torch():
    """prepare's pool and the background merge re-import the main module in every worker."""
    code = "import sys, virnuc_ds.run; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_parts_finished_in_the_background_are_complete_once_drained(tmp_path):
    from virnuc_ds.pipeline.parts import PartFinisher, part_path

    finisher = PartFinisher()
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    for k in range(5):
        write_part(part_path(tmp_path, k), k, np.arange(3) + 3 * k, [f"f{3 * k + i}" for i in range(3)], rows, rows, "fp", finisher)
    finisher.drain()
    for k in range(5):
        part = read_part(part_path(tmp_path, k))
        assert part["ids"] == [f"f{3 * k + i}" for i in range(3)] and part["fingerprint"] == "fp"
    assert not list((tmp_path / PARTS_DIR).glob(".*.tmp"))
    # a part whose rename fails is reported, and its temporary file does not linger
    (tmp_path / PARTS_DIR / "part-000009.h5").mkdir()  # a folder where the file should go
    write_part(part_path(tmp_path, 9), 9, np.arange(3), ["a", "b", "c"], rows, rows, "fp", finisher)
    with pytest.raises(OSError):
        finisher.close()
    assert not list((tmp_path / PARTS_DIR).glob(".*.tmp"))


def test_an_abandoned_background_merge_removes_its_temporary_file(demo, one_rank, tmp_path):
    """Rank 0 stops (SIGTERM, Ctrl-C) and abandons the merge process: its temporary embeddings file goes too."""
    out = _copy_without_results(one_rank, tmp_path / "o")
    fingerprint = read_part(sorted((out / PARTS_DIR).glob("part-*.h5"))[0])["fingerprint"]
    import time

    merger = BackgroundMerge(out, out / "prep", fingerprint, {}, str(demo["classifier"]), "cpu", threads=1)
    try:
        deadline = time.time() + 120
        while not list(out.glob(".embeddings.h5.*")) and merger.process.is_alive():  # it has begun writing
            assert time.time() < deadline
            merger.process.join(0.05)
    finally:
        merger.abandon()
    assert merger.process.exitcode >= 0  # left through Python (its finally blocks ran), not killed by the signal
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".embeddings.h5*"))
