"""The HDF5 embedding store: round trip, atomicity, and refusal of other files."""

import h5py
import numpy as np
import pytest

from virnuc_ds.errors import InputError
from virnuc_ds.store.embeddings import Embeddings, read_embeddings, write_embeddings


def test_round_trip_keeps_ids_values_and_attributes(tmp_path):
    rng = np.random.default_rng(1)
    ids = ["a_chunk_1F1", "b/c:d_chunk_2R3", "ünïcode_chunk_1F2"]
    emb = Embeddings(ids, rng.standard_normal((3, 768)), rng.standard_normal((3, 2560)))
    write_embeddings(tmp_path / "e.h5", emb, esm2_model="esm2_t36_3B_UR50D", dtype="bfloat16")
    back = read_embeddings(tmp_path / "e.h5")
    assert back.ids == ids
    np.testing.assert_array_equal(back.dnabert_s, emb.dnabert_s)
    np.testing.assert_array_equal(back.esm2, emb.esm2)
    assert back.attrs["esm2_model"] == "esm2_t36_3B_UR50D" and back.attrs["format"] == "virnuc-ds embeddings"
    with h5py.File(tmp_path / "e.h5") as f:
        assert f["esm2"].dtype == np.float32 and f["esm2"].shape == (3, 2560)
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_nothing(tmp_path):
    emb = Embeddings(["a"], np.zeros((1, 4)), np.zeros((1, 6)))
    with pytest.raises(TypeError):
        write_embeddings(tmp_path / "e.h5", emb, bad=object())
    assert list(tmp_path.iterdir()) == []


def test_misaligned_rows_are_refused():
    with pytest.raises(ValueError):
        Embeddings(["a", "b"], np.zeros((2, 4)), np.zeros((1, 6)))


def test_other_files_are_refused(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        read_embeddings(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["ids"] = [b"a"]
    with pytest.raises(InputError, match="missing datasets dnabert_s, esm2"):
        read_embeddings(tmp_path / "y.h5")
