"""import-legacy + classify against the original's outputs, and the classifier checkpoint formats."""

import numpy as np
import pytest
import torch

from virnuc_ds.classify.mlp import MLPClassifier, load_classifier, save_original_style
from virnuc_ds.cli import main
from virnuc_ds.errors import InputError
from virnuc_ds.store.embeddings import read_embeddings
from virnuc_ds.store.legacy import read_legacy_merged


def parse_results(path):
    rows = [line.split("\t") for line in path.read_text().splitlines()]
    return rows[0], rows[1:]


@pytest.fixture()
def classified(golden, tmp_path):
    p = golden / "predict"
    emb = tmp_path / "e.h5"
    assert main(["import-legacy", "--dnabert", str(p / "output_1_DNABERT_S.pt"), "--esm", str(p / "output_1_ESM.pt"), "-o", str(emb)]) == 0
    assert main(["classify", "-e", str(emb), "-p", str(p / "model.pth"), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 0
    return tmp_path / "out"


def test_highest_score_file_is_byte_identical(golden, classified):
    name = "prediction_results_highestscore.csv"
    assert (classified / name).read_bytes() == (golden / "predict" / name).read_bytes()


def _highest_score_by_dict(ids, probabilities):
    """The original's reading of the highest-score table, spelled out: per Modified_ID the maximum
    of each score as Python floats, keys sorted, Is_Virus = max score2 >= max score1."""
    best = {}
    for rid, (p0, p1) in zip(ids, probabilities):
        cur = best.setdefault(rid[:-2], [float(p0), float(p1)])
        cur[0], cur[1] = max(cur[0], float(p0)), max(cur[1], float(p1))
    return [(key, best[key][1] >= best[key][0]) for key in sorted(best)]


def test_sequence_groups_equal_the_per_frame_loop_with_and_without_dropped_frames():
    from virnuc_ds.classify.predict import SequenceGroups

    rng = np.random.default_rng(5)
    names = ["seq_1", "Seq_10", "seq_2", "a", "ä_x", "seq_1_1", "z", "1"]
    ids = [f"{names[k]}{tag}" for k in rng.integers(0, len(names), 400) for tag in rng.choice(["F1", "R3"], 1)]
    probabilities = rng.random((len(ids), 2), dtype=np.float32)
    probabilities[::7, 1] = probabilities[::7, 0]  # ties count as virus
    groups = SequenceGroups(ids)
    assert groups.table(probabilities) == _highest_score_by_dict(ids, probabilities)
    keep = rng.random(len(ids)) > 0.5
    keep[[i for i, rid in enumerate(ids) if rid.startswith("z")]] = False  # a whole sequence dropped
    kept_ids = [rid for rid, k in zip(ids, keep) if k]
    table = groups.table(probabilities, keep)
    assert table == _highest_score_by_dict(kept_ids, probabilities[keep])
    assert all(not key.startswith("z") for key, _ in table)
    near_tie = np.array([[0.5 + 1e-12, 0.5]], dtype=np.float64)  # no float32 rounding of float64 scores
    assert SequenceGroups(["aF1"]).table(near_tie) == _highest_score_by_dict(["aF1"], near_tie) == [("a", False)]


def test_prediction_results_match_original(golden, classified):
    name = "prediction_results.txt"
    head, rows = parse_results(classified / name)
    ghead, grows = parse_results(golden / "predict" / name)
    assert head == ghead == ["Sequence_ID", "Prediction", "score1", "score2"]
    assert [r[:2] for r in rows] == [r[:2] for r in grows]  # ids, order and labels identical
    scores = np.array([[float(r[2]), float(r[3])] for r in rows])
    gscores = np.array([[float(r[2]), float(r[3])] for r in grows])
    # float32 softmax of a 3328-wide dot product: summation order (BLAS build, CPU vs GPU) moves
    # the last bits only.
    np.testing.assert_allclose(scores, gscores, rtol=0, atol=2e-6)
    # each score is printed as Python prints a numpy float32 (shortest round-trip repr)
    assert all(r[2] == str(np.float32(r[2])) and r[3] == str(np.float32(r[3])) for r in rows)


def test_imported_store_equals_original_merged_file(golden, tmp_path):
    p = golden / "predict"
    main(["import-legacy", "--dnabert", str(p / "output_1_DNABERT_S.pt"), "--esm", str(p / "output_1_ESM.pt"), "-o", str(tmp_path / "a.h5")])
    main(["import-legacy", "--merged", str(p / "output_1_merged.pt"), "-o", str(tmp_path / "b.h5")])
    a, b = read_embeddings(tmp_path / "a.h5"), read_embeddings(tmp_path / "b.h5")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.features(), b.features())
    merged = read_legacy_merged(p / "output_1_merged.pt")
    np.testing.assert_array_equal(a.features(), merged.features())


def test_classifier_formats_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MLPClassifier(20, 8, 2).eval()
    save_original_style(model, tmp_path / "whole.pth")
    torch.save(model.state_dict(), tmp_path / "state.pth")
    x = torch.randn(5, 20)
    for name in ("whole.pth", "state.pth"):
        loaded = load_classifier(tmp_path / name, expected_input_dim=20)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_classifier_of_wrong_width_is_refused(golden, tmp_path):
    with pytest.raises(InputError, match="takes 3328 features but the embeddings have 100"):
        load_classifier(golden / "predict" / "model.pth", expected_input_dim=100)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a VirNucPro classifier checkpoint"):
        load_classifier(tmp_path / "junk.pth")


def test_classify_on_batches_larger_than_one_call(golden, tmp_path):
    """Rows are processed in the original's 256-row batches: results do not depend on N."""
    from virnuc_ds.classify.predict import predict_probabilities

    model = load_classifier(golden / "predict" / "model.pth")
    x = np.random.default_rng(0).standard_normal((700, 3328)).astype(np.float32)
    whole = predict_probabilities(model, x)
    parts = np.concatenate([predict_probabilities(model, x[:256]), predict_probabilities(model, x[256:512]), predict_probabilities(model, x[512:])])
    np.testing.assert_array_equal(whole, parts)


def test_pickles_naming_other_torch_classes_load_but_foreign_code_is_refused(tmp_path):
    """An original-style pickle from another torch version may name extra torch classes: accepted.
    A pickle that names anything outside torch is refused, never executed."""
    import pickle

    torch.manual_seed(1)
    model = MLPClassifier(20, 8, 2).eval()
    model.extra_activation = torch.nn.ReLU()  # a torch class not in the weights-only allowlist
    save_original_style(model, tmp_path / "other_torch.pth")
    loaded = load_classifier(tmp_path / "other_torch.pth", expected_input_dim=20)
    x = torch.randn(3, 20)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump(Evil(), fh)
    with pytest.raises(InputError, match="not a VirNucPro classifier checkpoint"):
        load_classifier(tmp_path / "evil.pth")


def test_a_tie_is_others_per_frame_and_virus_per_sequence():
    """DESIGN: a frame whose two scores are equal is `others`; a sequence whose best score2 equals its
    best score1 is Is_Virus True (max(score2) >= max(score1))."""
    from virnuc_ds.classify.predict import highest_score_table, prediction_line

    tie = np.array([0.5, 0.5], dtype=np.float32)
    assert prediction_line("s_chunk_1F1", tie).split("\t")[1] == "others"
    assert prediction_line("s_chunk_1F1", np.array([0.5, 0.50000006], dtype=np.float32)).split("\t")[1] == "virus"
    probabilities = np.array([[0.7, 0.3], [0.4, 0.7], [0.5, 0.5]], dtype=np.float32)
    ids = ["a_chunk_1F1", "a_chunk_1R2", "b_chunk_1F1"]
    assert highest_score_table(ids, probabilities) == [("a_chunk_1", True), ("b_chunk_1", True)]


def test_legacy_files_listing_frames_in_different_orders_are_joined_by_id(golden, tmp_path):
    """The original's two embedding files need not list frames in the same order: the import joins
    them by id, so a shuffled ESM file gives the same store."""
    p = golden / "predict"
    esm = torch.load(p / "output_1_ESM.pt", map_location="cpu", weights_only=True)
    order = list(reversed(range(len(esm["proteins"]))))
    torch.save({"proteins": [esm["proteins"][k] for k in order], "data": [esm["data"][k] for k in order]},
               tmp_path / "shuffled_ESM.pt")
    for name, esm_file in (("a.h5", p / "output_1_ESM.pt"), ("b.h5", tmp_path / "shuffled_ESM.pt")):
        assert main(["import-legacy", "--dnabert", str(p / "output_1_DNABERT_S.pt"), "--esm", str(esm_file),
                     "-o", str(tmp_path / name)]) == 0
    a, b = read_embeddings(tmp_path / "a.h5"), read_embeddings(tmp_path / "b.h5")
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.features(), b.features())
    np.testing.assert_array_equal(a.features(), read_legacy_merged(p / "output_1_merged.pt").features())
