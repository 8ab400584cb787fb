"""Bad input: a one-line error naming file, record and reason, exit code 1, no partial output."""

import pytest

from virnuc_ds.cli import main

GOOD = ">a\nACGTACGTAAATTTGGG\n>b desc\nACGTTTT\n"


def run_prepare(tmp_path, capsys, text=None, path=None, out=None):
    if path is None:
        path = tmp_path / "in.fa"
        path.write_text(text)
    out = out or tmp_path / "out"
    code = main(["prepare", "-i", str(path), "-m", "300", "-o", str(out), "-w", "1"])
    err = capsys.readouterr().err.strip()
    return code, err, out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "contains no FASTA records"),
        ("\n\n", "contains no FASTA records"),
        ("hello world\nACGT\n", "line 1 comes before any '>' header: not a FASTA file"),
        (">a\nACGT\n>a\nACGT\n", "record 'a': duplicate record id"),
        (">a\nACGT\n>b\nACGTXEACGT\n", "record 'b': character 'X' at position 5 is not a nucleotide code"),
        (">a\nACGT\n>b\n\n>c\nAC\n", "record 'b': empty sequence"),
        (">a\nACG1T\n", "record 'a': character '1' at position 4"),
    ],
)
def test_bad_fasta(tmp_path, capsys, text, expected):
    code, err, out = run_prepare(tmp_path, capsys, text)
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert str(tmp_path / "in.fa") in err and expected in err
    assert not out.exists(), "no partial output may be left, nor the folder prepare created"


def test_missing_file(tmp_path, capsys):
    code, err, _ = run_prepare(tmp_path, capsys, path=tmp_path / "nope.fa")
    assert code == 1 and "nope.fa: file not found" in err and len(err.splitlines()) == 1


def test_unwritable_output_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err, _ = run_prepare(tmp_path, capsys, GOOD, out=blocker / "sub")
    assert code == 1 and "output folder is not writable" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_unusable_output_path_is_a_one_line_error_in_any_run(tmp_path, world_size):
    """A name the file system refuses (too long) is reported as such by every rank, not as a
    traceback: also by the ranks of a distributed run, which look for the output folder's manifest
    before their process group forms (to start loading models early)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "in.fa").write_text(GOOD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29791")
    cmd = [sys.executable, "-m", "virnuc_ds.run", "-i", str(tmp_path / "in.fa"), "-m", "300", "-o", str(tmp_path / ("x" * 300)), "--cpu"]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    errors = [p.communicate(timeout=300)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [1] * world_size, errors
    for err in errors:
        assert "Traceback" not in err and "output folder is not writable (File name too long)" in err


def test_classify_missing_inputs(tmp_path, capsys):
    code = main(["classify", "-e", str(tmp_path / "none.h5"), "-p", str(tmp_path / "m.pth"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "none.h5: file not found" in err
    assert not (tmp_path / "o" / "prediction_results.txt").exists()


def test_classify_refuses_non_finite_embeddings(tmp_path, capsys):
    import numpy as np

    from conftest import GOLDEN
    from virnuc_ds.store.embeddings import read_embeddings, write_embeddings

    p = GOLDEN / "predict"
    good = tmp_path / "good.h5"
    assert main(["import-legacy", "--dnabert", str(p / "output_1_DNABERT_S.pt"), "--esm", str(p / "output_1_ESM.pt"), "-o", str(good)]) == 0
    emb = read_embeddings(good)
    emb.esm2[3, 7] = np.nan
    write_embeddings(tmp_path / "bad.h5", emb)
    capsys.readouterr()
    code = main(["classify", "-e", str(tmp_path / "bad.h5"), "-p", str(p / "model.pth"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"bad.h5: record {emb.ids[3]!r}: 1 of {len(emb)} frames have NaN or Inf embeddings" in err
    assert not (tmp_path / "o" / "prediction_results.txt").exists()


def test_import_legacy_of_a_non_torch_file(tmp_path, capsys):
    bad = tmp_path / "x_DNABERT_S.pt"
    bad.write_text("hello")
    code = main(["import-legacy", "--dnabert", str(bad), "--esm", str(bad), "-o", str(tmp_path / "e.h5")])
    err = capsys.readouterr().err
    assert code == 1 and "x_DNABERT_S.pt: not a readable torch file" in err
    assert not (tmp_path / "e.h5").exists()


def test_writable_probe_does_not_collide_with_another_process(tmp_path):
    """Ranks on several nodes probe one shared output folder at once and may share a pid."""
    import os

    from virnuc_ds.atomic import ensure_writable_dir

    out = tmp_path / "shared"
    (out / f".write-test-{os.getpid()}").mkdir(parents=True)  # another node's rank, same pid, mid-probe
    assert ensure_writable_dir(out) == out


@pytest.mark.parametrize("flag, value, expected", [
    ("--esm-batch-tokens", "-5", "argument --esm-batch-tokens: must be at least 1024, got -5"),
    ("--dnabert-batch-tokens", "100", "argument --dnabert-batch-tokens: must be at least 1024, got 100"),
    ("--esm-batch-tokens", "lots", "argument --esm-batch-tokens: not a whole number: 'lots'"),
    ("-m", "400", "argument -m/--expected-length: invalid choice: 400"),
])
def test_a_bad_command_line_exits_1_before_any_work(tmp_path, capsys, flag, value, expected):
    # exit code 2 means "incomplete result": a wrapper script must not read a typo as that
    with pytest.raises(SystemExit) as stop:
        main(["run", "-i", str(tmp_path / "in.fa"), "-m", "500", "-o", str(tmp_path / "out"), flag, value])
    assert stop.value.code == 1
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_model_names_the_config_folder_it_was_looked_for_in(demo, tmp_path, capsys):
    from conftest import SAMPLE

    import yaml

    config = tmp_path / "cfg" / "run.yaml"
    config.parent.mkdir()
    settings = yaml.safe_load(demo["config"].read_text())
    settings["models"] = {"esm2": "esm2_missing.pt", "dnabert_s": str(demo["dnabert_s"]), "classifier": str(demo["classifier"])}
    config.write_text(yaml.safe_dump(settings))
    assert main(["run", "-c", str(config), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"looked in: {config.parent / 'esm2_missing.pt'}, " in err
    assert not (tmp_path / "out" / "run_manifest.json").exists()


def test_an_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "in.fa").write_text(GOOD)
    (tmp_path / "taken").write_text("a file")
    assert main(["prepare", "-i", str(tmp_path / "in.fa"), "-m", "300", "-o", str(tmp_path / "taken")]) == 1
    assert capsys.readouterr().err.strip() == f"virnuc-ds: error: {tmp_path / 'taken'}: is a file, not a folder: name a folder to write into"


# --- bad model files: one line naming the file, exit 1, no GPU work spent first -------------------------


@pytest.fixture
def broken_demo(demo, tmp_path):
    """A private copy of the demo models, to break one file of."""
    import shutil

    from virnuc_ds.demo import DEMO_CONFIG

    folder = shutil.copytree(demo["config"].parent, tmp_path / "models")
    return {"folder": folder, "config": folder / DEMO_CONFIG, "esm2": folder / demo["esm2"].name,
            "dnabert_s": folder / demo["dnabert_s"].name, "classifier": folder / demo["classifier"].name}


def _run(models, out, *extra):
    from conftest import SAMPLE

    return main(["run", "-c", str(models["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(out), *extra])


def _half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "not a readable ESM-2 checkpoint"),
    ("empty", "not a readable ESM-2 checkpoint"),
    ("text", "not a readable ESM-2 checkpoint"),
])
def test_a_broken_esm2_checkpoint_is_one_line_and_the_fixed_one_then_runs(broken_demo, tmp_path, capsys, damage, expected):
    esm2 = broken_demo["esm2"]
    good = esm2.read_bytes()
    esm2.write_bytes({"truncate": good[: len(good) // 2], "empty": b"", "text": b"esm2 weights\n"}[damage])
    out = tmp_path / "out"
    assert _run(broken_demo, out) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"{esm2}: {expected}" in err[0], err
    assert not list((out / "parts").glob("part-*.h5")) and not (out / "embeddings.h5").exists()
    esm2.write_bytes(good)  # the user fixes the file and reruns the same command: not refused
    assert _run(broken_demo, out) == 0, capsys.readouterr().err


def test_an_esm2_checkpoint_whose_weights_do_not_fit_its_config(broken_demo, tmp_path, capsys):
    import torch

    data = torch.load(broken_demo["esm2"], weights_only=False)
    data["cfg"]["model"].encoder_layers += 1  # the config says one layer more than the weights hold
    torch.save(data, broken_demo["esm2"])
    assert _run(broken_demo, tmp_path / "out") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "its weights do not fit the ESM-2 its own config describes" in err[0], err


@pytest.mark.parametrize("name, content, expected", [
    ("config.json", "{not json", "config.json: not a readable model config"),
    ("config.json", "[1, 2]", "config.json: not a model config"),
    ("config.json", '{"hidden_size": "48"}', "config.json: hidden_size must be int, got '48'"),
    ("tokenizer.json", "{}", "tokenizer.json: not a readable tokenizer"),
    ("model.safetensors", None, "model.safetensors: not a readable weights file"),
])
def test_a_broken_dnabert_s_folder_is_one_line(broken_demo, tmp_path, capsys, name, content, expected):
    path = broken_demo["dnabert_s"] / name
    if content is None:
        _half(path)
    else:
        path.write_text(content)
    assert _run(broken_demo, tmp_path / "out") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and expected in err[0], err


def test_dnabert_s_weights_that_do_not_fit_its_config_are_one_short_line(broken_demo, tmp_path, capsys):
    import json

    config = broken_demo["dnabert_s"] / "config.json"
    settings = json.loads(config.read_text())
    settings["intermediate_size"] += 8
    config.write_text(json.dumps(settings))
    assert _run(broken_demo, tmp_path / "out") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "weights do not match the DNABERT-S that config.json describes" in err[0] and len(err[0]) < 600, err


def test_a_broken_classifier_is_found_before_any_gpu_work(broken_demo, tmp_path, capsys):
    _half(broken_demo["classifier"])
    out = tmp_path / "out"
    assert _run(broken_demo, out) == 1
    err = capsys.readouterr().err
    assert f"{broken_demo['classifier']}: not a VirNucPro classifier checkpoint" in err
    assert not out.exists() or not list((out / "parts").glob("part-*.h5"))


def test_a_classifier_of_other_widths_is_refused_before_any_part(broken_demo, tmp_path, capsys):
    from virnuc_ds.classify.mlp import MLPClassifier, save_original_style

    save_original_style(MLPClassifier(100, 16, 2).eval(), broken_demo["classifier"])
    out = tmp_path / "out"
    assert _run(broken_demo, out) == 1
    assert "classifier takes 100 features but the models give" in capsys.readouterr().err
    assert not list((out / "parts").glob("part-*.h5"))


def test_a_failed_rerun_leaves_no_earlier_predictions_behind(demo, one_rank, broken_demo, tmp_path, capsys):
    # a finished folder classified again with an unfit classifier: the old results must not stay, as
    # if they were this run's
    import shutil

    from virnuc_ds.classify.mlp import MLPClassifier, save_original_style

    out = shutil.copytree(one_rank, tmp_path / "done")
    save_original_style(MLPClassifier(100, 16, 2).eval(), tmp_path / "other.pth")
    assert _run(demo, out, "-p", str(tmp_path / "other.pth")) == 1
    assert "classifier takes 100 features" in capsys.readouterr().err
    assert not (out / "prediction_results.txt").exists() and not (out / "prediction_results_highestscore.csv").exists()


def test_classify_on_a_gpu_that_is_not_there(demo, one_rank, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main(["classify", "-e", str(one_rank / "embeddings.h5"), "-p", str(demo["classifier"]), "-o", str(tmp_path / "o"),
                 "--device", "cuda"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'cuda' but this machine has no usable CUDA GPU" in err
    assert not (tmp_path / "o" / "prediction_results.txt").exists()


def test_import_legacy_of_an_empty_file(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert main(["import-legacy", "--merged", str(tmp_path / "empty.pt"), "-o", str(tmp_path / "x.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty.pt: not a readable torch file (EOFError" in err
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("entry", ["virnuc_ds.cli", "virnuc_ds.run"])
def test_a_signal_after_the_outcome_is_decided_does_not_change_the_exit_code(tmp_path, entry):
    """A repeated SIGTERM or Ctrl-C during the interpreter's teardown: the exit code stays the run's."""
    import os
    import subprocess
    import sys

    args = ["report", str(tmp_path / "none")] if entry == "virnuc_ds.cli" else ["-i", str(tmp_path / "none.fa"), "-o", str(tmp_path / "o")]
    code = (f"import os, signal, sys; sys.argv = ['prog', *{args!r}]; from {entry} import main; code = main(); "
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGINT); sys.exit(code)")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error:" in proc.stderr
