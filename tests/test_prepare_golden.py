"""`prepare` reproduces the original tool's chunking and six-frame selection (golden files)."""

import gzip
import shutil

import pytest

from conftest import read_records
from virnuc_ds.cli import main
from virnuc_ds.prep.prepare import CHUNKED_FASTA, NUCLEOTIDE_FASTA, PROTEIN_FASTA, prepare

OUTPUTS = {CHUNKED_FASTA: "chunked{L}.fa", NUCLEOTIDE_FASTA: "identified_nucleotide{L}.fa", PROTEIN_FASTA: "identified_protein{L}.faa"}


@pytest.mark.parametrize("length", [300, 500])
def test_prepare_matches_original(golden, tmp_path, length):
    stats = prepare(golden / "prep" / "input.fa", length, tmp_path, workers=1)
    for mine, theirs in OUTPUTS.items():
        expected = read_records(golden / "prep" / theirs.format(L=length))
        assert read_records(tmp_path / mine) == expected, mine
    assert stats.records == 300
    assert stats.frames == len(read_records(golden / "prep" / f"identified_protein{length}.faa"))


def test_prepare_same_for_any_worker_count_and_block_size(golden, tmp_path):
    prepare(golden / "prep" / "input.fa", 500, tmp_path / "one", workers=1)
    prepare(golden / "prep" / "input.fa", 500, tmp_path / "two", workers=2, block_bytes=5000)
    for name in OUTPUTS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_prepare_reads_gzip_and_windows_line_endings(golden, tmp_path):
    text = (golden / "prep" / "input.fa").read_text()
    gz = tmp_path / "input.fa.gz"
    with gzip.open(gz, "wt", newline="") as fh:
        fh.write(text.replace("\n", "\r\n"))
    assert main(["prepare", "-i", str(gz), "-m", "300", "-o", str(tmp_path / "out"), "-w", "1"]) == 0
    expected = read_records(golden / "prep" / "identified_protein300.faa")
    assert read_records(tmp_path / "out" / PROTEIN_FASTA) == expected


def test_prepare_cli_writes_the_three_files(golden, tmp_path, capsys):
    shutil.copy(golden / "prep" / "input.fa", tmp_path / "in.fa")
    assert main(["prepare", "-i", str(tmp_path / "in.fa"), "-m", "500", "-o", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(OUTPUTS)
    assert "300 records" in capsys.readouterr().out
