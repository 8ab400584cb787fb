"""The rank runner end to end on the tiny demo models: parity, rank-count invariance, resume, merge checks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from virnuc_ds.cli import main
from virnuc_ds.pipeline.parts import PARTS_DIR
from virnuc_ds.pipeline.shard import assign_parts, plan_parts
from virnuc_ds.store.embeddings import read_embeddings

ROOT = Path(__file__).parents[1]


from conftest import SAMPLE, cosine_rows, run_cli


def test_outputs_complete_and_in_frame_order(one_rank):
    from conftest import read_records

    emb = read_embeddings(one_rank / "embeddings.h5")
    frames = [rid for rid, _ in read_records(one_rank / "prep" / "identified_protein.faa")]
    assert emb.ids == frames and len(set(frames)) == len(frames)
    assert np.isfinite(emb.features()).all()
    rows = (one_rank / "prediction_results.txt").read_text().splitlines()
    assert [r.split("\t")[0] for r in rows[1:]] == frames
    report = json.loads((one_rank / "run_report.json").read_text())
    assert report["frames"] == len(frames) and report["ranks"][0]["esm2_tokens"] > 0
    # prepare ran niced, below the ranks' model loads (or as nice as the system allows)
    assert report["prepare"]["niceness"] >= min(19, os.nice(0) + 10)


def test_esm2_embeddings_equal_fair_esm_one_at_a_time(demo, one_rank):
    """The runner's pooled ESM-2 vectors are fair-esm's own fp32 forward, one sequence at a time."""
    from conftest import read_records
    from virnuc_ds.models.esm2 import load_esm2

    model, alphabet = load_esm2(demo["esm2"])
    convert = alphabet.get_batch_converter()
    emb = read_embeddings(one_rank / "embeddings.h5")
    proteins = dict(read_records(one_rank / "prep" / "identified_protein.faa"))
    worst = 0.0
    with torch.no_grad():
        for k in range(0, len(emb.ids), 7):  # every 7th frame keeps the test fast
            _, _, toks = convert([(emb.ids[k], proteins[emb.ids[k]])])
            rep = model(toks, repr_layers=[model.num_layers])["representations"][model.num_layers]
            ref = rep[0, 1 : len(proteins[emb.ids[k]]) + 1].mean(0).numpy()
            worst = max(worst, float(np.abs(ref - emb.esm2[k]).max()))
    assert worst <= 1e-5


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher_match_one_rank(demo, one_rank, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29731", "--module",
        "virnuc_ds.run", "-c", str(demo["config"]), "-i", str(SAMPLE), "-m", "500", "-o", str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = read_embeddings(one_rank / "embeddings.h5"), read_embeddings(out / "embeddings.h5")
    assert a.ids == b.ids
    assert cosine_rows(a.features(), b.features()).min() >= 0.99999
    labels = lambda p: [r.split("\t")[:2] for r in (p / "prediction_results.txt").read_text().splitlines()]
    assert labels(one_rank) == labels(out)
    assert (one_rank / "prediction_results_highestscore.csv").read_text() == (out / "prediction_results_highestscore.csv").read_text()
    # the ranks split the parts: each part computed by exactly one rank, both ranks busy
    ranks = json.loads((out / "run_report.json").read_text())["ranks"]
    assert len(ranks) == 2 and all(r["parts_computed"] for r in ranks)
    by_rank = [set(r["parts_computed"]) for r in ranks]
    assert not by_rank[0] & by_rank[1]
    assert by_rank[0] | by_rank[1] == {int(p.stem.split("-")[1]) for p in (out / PARTS_DIR).glob("part-*.h5")}
    assert sum(r["esm2_tokens"] for r in ranks) == json.loads((one_rank / "run_report.json").read_text())["ranks"][0]["esm2_tokens"]
    # a fresh distributed run's ranks load their models while the process group forms
    assert all("model_load_wait" in r and r["model_load"] > 0 for r in ranks)


def test_batch_budget_does_not_change_results(demo, one_rank, tmp_path):
    out = tmp_path / "small_batches"
    assert run_cli(demo, out, "--esm-batch-tokens", "1024", "--dnabert-batch-tokens", "1024") == 0
    a, b = read_embeddings(one_rank / "embeddings.h5"), read_embeddings(out / "embeddings.h5")
    assert a.ids == b.ids
    assert cosine_rows(a.esm2, b.esm2).min() >= 0.99999
    assert cosine_rows(a.dnabert_s, b.dnabert_s).min() >= 0.99999
    labels = lambda p: [r.split("\t")[:2] for r in (p / "prediction_results.txt").read_text().splitlines()]
    assert labels(one_rank) == labels(out)
    highest = "prediction_results_highestscore.csv"
    assert (one_rank / highest).read_text() == (out / highest).read_text()


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 0), torch.float16)])
def test_auto_dtype_is_bf16_from_ampere_on_fp16_before_and_fp32_on_cpu(monkeypatch, capability, expected):
    from virnuc_ds.pipeline.runner import resolve_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda", 0)) == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp32", torch.device("cuda", 0)) == torch.float32


def test_resume_skips_finished_parts_and_force_recomputes(demo, one_rank, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(one_rank, out)
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    assert len(parts) >= 2
    parts[0].unlink()  # as if the run died before this part finished
    (out / "embeddings.h5").unlink()
    stamp = parts[1].stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(demo, out) == 0
    assert parts[1].stat().st_mtime_ns == stamp, "a finished part was recomputed"
    assert "1 to compute" in capsys.readouterr().err
    np.testing.assert_array_equal(read_embeddings(out / "embeddings.h5").features(), read_embeddings(one_rank / "embeddings.h5").features())
    assert run_cli(demo, out, "--force") == 0
    assert f"{len(parts)} to compute" in capsys.readouterr().err


def test_merge_reports_missing_frames_with_exit_code_2(demo, one_rank, tmp_path, capsys):
    out = tmp_path / "broken"
    shutil.copytree(one_rank, out)
    (out / "embeddings.h5").unlink()
    victim = sorted((out / PARTS_DIR).glob("part-*.h5"))[-1]
    with h5py.File(victim) as f:
        first_id, n_lost = f["ids"][0].decode(), len(f["ids"])
    victim.unlink()
    assert n_lost > 5
    assert main(["merge", "-o", str(out), "-c", str(demo["config"])]) == 2
    err = capsys.readouterr().err
    assert f"{n_lost} of " in err and "have no embeddings" in err and first_id in err and len(err.strip().splitlines()) == 1
    assert f" and {n_lost - 5} more)" in err  # five named, the rest counted
    assert not (out / "embeddings.h5").exists()


def test_another_input_in_the_same_output_dir_is_refused(demo, one_rank, tmp_path, capsys):
    out = tmp_path / "reuse"
    shutil.copytree(one_rank, out)
    other = tmp_path / "other.fa"
    other.write_text(">x\n" + "ATG" * 120 + "\n")
    assert run_cli(demo, out, input_path=other) == 1
    assert "holds a run with another input_sha256" in capsys.readouterr().err
    assert run_cli(demo, out, "--force", input_path=other) == 0
    assert read_embeddings(out / "embeddings.h5").ids[0].startswith("x_chunk_1")


def test_bad_input_leaves_no_manifest_so_the_corrected_input_runs(demo, tmp_path, capsys):
    out, fasta = tmp_path / "out", tmp_path / "in.fa"
    fasta.write_text(">a\nACGT\n>a\nACGT\n")
    assert run_cli(demo, out, input_path=fasta) == 1
    assert "duplicate record id" in capsys.readouterr().err
    assert not out.exists(), "bad input must leave no partial output (not even the folder it created)"
    out.mkdir()  # a folder the user made: kept, empty but for the lock
    (out / "notes.txt").write_text("mine")
    assert run_cli(demo, out, input_path=fasta) == 1
    assert not (out / "run_manifest.json").exists() and (out / "notes.txt").exists()
    fasta.write_text(">a\n" + "ATG" * 120 + "\n")  # the user fixes the file and reruns the same command
    assert run_cli(demo, out, input_path=fasta) == 0, capsys.readouterr().err


def test_input_without_any_open_reading_frame_is_a_clear_error(demo, tmp_path, capsys):
    out, fasta = tmp_path / "out", tmp_path / "in.fa"
    fasta.write_text(">a\nAC\n>b\nNNNNNNN\n")  # no frame of one codon or more survives
    assert run_cli(demo, out, input_path=fasta) == 1
    err = capsys.readouterr().err.strip()
    assert "no open reading frame" in err and "Traceback" not in err
    assert not (out / "run_manifest.json").exists() and not (out / "prep" / "identified_protein.faa").exists()


def test_merge_reports_the_runs_own_chunk_length(demo, one_rank, tmp_path, capsys):
    out = tmp_path / "merged"
    shutil.copytree(one_rank, out)
    cfg = tmp_path / "c300.yaml"  # a config for another chunk length must not relabel this run
    cfg.write_text("prepare:\n  expected_length: 300\n")
    assert main(["merge", "-o", str(out), "-c", str(cfg), "-p", str(demo["classifier"])]) == 0
    assert json.loads((out / "run_report.json").read_text())["expected_length"] == 500


def test_merge_without_a_classifier_classifies_with_the_runs_own(demo, one_rank, tmp_path, capsys):
    """`virnuc-ds merge -o OUT` alone must not leave the folder without its predictions."""
    out = tmp_path / "merged"
    shutil.copytree(one_rank, out)
    results = {n: (out / n).read_bytes() for n in ("prediction_results.txt", "prediction_results_highestscore.csv")}
    assert json.loads((out / "run_report.json").read_text())["classifier"] == str(demo["classifier"])
    assert main(["merge", "-o", str(out)]) == 0
    assert results == {n: (out / n).read_bytes() for n in results}
    moved = tmp_path / "moved.pth"  # the run's classifier gone: an error, and the results stay
    shutil.copy(demo["classifier"], moved)
    report = json.loads((out / "run_report.json").read_text())
    report["classifier"] = str(tmp_path / "gone.pth")
    (out / "run_report.json").write_text(json.dumps(report))
    capsys.readouterr()
    assert main(["merge", "-o", str(out)]) == 1
    assert "gone.pth: the run's classifier is not there any more; pass -p" in capsys.readouterr().err
    assert results == {n: (out / n).read_bytes() for n in results}
    assert main(["merge", "-o", str(out), "-p", str(moved)]) == 0
    assert results == {n: (out / n).read_bytes() for n in results}


def test_the_runs_classifier_is_recorded_absolute_so_merge_finds_it_from_anywhere(demo, tmp_path, monkeypatch):
    """A classifier named relative to the working folder (not the config's): merge, run elsewhere, finds it."""
    import yaml

    cfg = yaml.safe_load(demo["config"].read_text())
    folder = demo["config"].parent
    cfg["models"] = {"esm2": str(folder / cfg["models"]["esm2"]), "dnabert_s": str(folder / cfg["models"]["dnabert_s"]),
                     "classifier": demo["classifier"].name}
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    monkeypatch.chdir(folder)
    assert main(["run", "-c", str(tmp_path / "cfgdir" / "c.yaml"), "-i", str(SAMPLE), "-m", "500", "-o", str(out)]) == 0
    assert json.loads((out / "run_report.json").read_text())["classifier"] == str(demo["classifier"].resolve())
    before = (out / "prediction_results.txt").read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["merge", "-o", str(out)]) == 0
    assert (out / "prediction_results.txt").read_bytes() == before


def test_predict_quiet_and_no_progress_are_this_commands_only(demo, tmp_path, monkeypatch):
    import logging

    monkeypatch.delenv("VIRNUC_DS_QUIET", raising=False)
    monkeypatch.delenv("VIRNUC_DS_PROGRESS", raising=False)
    assert main(["predict", str(tmp_path / "none.fa"), "-p", str(demo["classifier"]), "-o", str(tmp_path / "o"),
                 "-d", "cpu", "--quiet", "--no-progress"]) == 1
    assert "VIRNUC_DS_QUIET" not in os.environ and "VIRNUC_DS_PROGRESS" not in os.environ
    assert logging.getLogger().getEffectiveLevel() == logging.INFO


def test_missing_model_names_where_it_looked(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"models:\n  esm2: {tmp_path / 'esm2_t36_3B_UR50D.pt'}\n")
    assert main(["run", "-c", str(cfg), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "esm2_t36_3B_UR50D.pt" in err


def test_parts_do_not_depend_on_world_size_and_are_token_balanced():
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 167, size=50_000)
    parts = plan_parts(lengths, 512)
    assert sorted(np.concatenate([p.frames for p in parts]).tolist()) == list(range(len(lengths)))
    for world in (1, 2, 3, 4, 8):
        shards = assign_parts(parts, world)
        assert sorted(p.index for s in shards for p in s) == list(range(len(parts)))
        loads = np.array([sum(p.cost for p in s) for s in shards])
        assert loads.max() <= loads.mean() * 1.03
        # the dealing ends with the quarter-size parts of the shortest frames: within one of them
        assert loads.max() - loads.mean() <= max(p.cost for p in parts[:16])
        assert assign_parts(parts, world) == shards  # deterministic
    sizes = [len(p.frames) for p in parts]
    assert sizes[:16] == [128] * 16 and set(sizes[16:-1]) == {512}
    shortest = max(lengths[p.frames].max() for p in parts[:16])
    assert all(lengths[p.frames].min() >= shortest for p in parts[16:])


def test_settings_that_do_not_change_the_numbers_keep_the_fingerprint(demo, one_rank, tmp_path, capsys):
    """On a CPU the kernels are never used, so turning them off must resume, not be refused."""
    import yaml

    out = tmp_path / "same"
    shutil.copytree(one_rank, out)
    cfg = yaml.safe_load(Path(demo["config"]).read_text())
    cfg["models"] = {k: str(Path(demo["config"]).parent / v) for k, v in cfg["models"].items()}
    cfg["esm2"].update({"replace_with_kernel_inject": False, "attention": "sdpa"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["run", "-c", str(tmp_path / "c.yaml"), "-i", str(SAMPLE), "-m", "500", "-o", str(out)]) == 0
    assert "0 to compute" in capsys.readouterr().err



def test_a_killed_prepare_process_is_a_clear_error(tmp_path):
    """The prepare process killed mid-way (here while it waits on an input that is a FIFO nobody
    writes): rank 0 gets a one-line error to act on, not a pool's traceback."""
    import signal

    from virnuc_ds.config import Config
    from virnuc_ds.errors import VirnucError
    from virnuc_ds.pipeline.prepare_stage import PrepareInBackground

    fifo = tmp_path / "input.fa"
    os.mkfifo(fifo)
    job = PrepareInBackground(Config(), fifo, tmp_path / "out", {"fingerprint": "f", "new_manifest": False})
    for process in list(job._pool._processes.values()):
        os.kill(process.pid, signal.SIGKILL)
    with pytest.raises(VirnucError, match="prepare's process ended abruptly"):
        job.result()
    assert not (tmp_path / "out" / "prep" / "identified_protein.faa").exists()


def test_the_prepare_process_ends_with_its_rank(tmp_path):
    """A rank killed with SIGKILL during prepare: its prepare process must not live on and rename its
    files into OUT/prep later, under a run started since (here it waits on a FIFO nobody writes)."""
    import psutil

    fifo = tmp_path / "input.fa"
    os.mkfifo(fifo)
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from virnuc_ds.config import Config\n"
        "from virnuc_ds.pipeline.prepare_stage import PrepareInBackground\n"
        f"job = PrepareInBackground(Config(), Path({str(fifo)!r}), Path({str(tmp_path / 'out')!r}), {{'fingerprint': 'f', 'new_manifest': False}})\n"
        "print(next(iter(job._pool._processes)), flush=True)\n"
        f"while not os.path.isdir({str(tmp_path / 'out' / 'prep')!r}):  # prepare has started\n"
        "    os.sched_yield()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == -9, proc.stderr[-2000:]
    child = psutil.Process(int(proc.stdout.split()[0]))
    try:
        child.wait(timeout=60)  # it notices within a second or two; a stuck one fails here
    except psutil.TimeoutExpired:
        child.kill()
        raise AssertionError("the prepare process outlived its rank")


def test_prepare_reports_how_far_it_got(tmp_path, monkeypatch, caplog):
    import logging

    from virnuc_ds.config import Config
    from virnuc_ds.pipeline import prepare_stage

    monkeypatch.setattr(prepare_stage, "PROGRESS_EVERY_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="virnuc_ds.run")
    cfg = Config()
    cfg.prepare.expected_length = 500
    cfg.prepare.workers = 1
    out = tmp_path / "out"
    info = prepare_stage.prepare_inputs(cfg, ROOT / "examples" / "sample.fa", out, {"fingerprint": "f", "new_manifest": False})
    assert info["stats"]["frames"] > 0
    assert "prepare: " in caplog.text and " frames so far" in caplog.text


def test_rank_0_warns_when_every_start_compiles_torch(demo, tmp_path, monkeypatch, capsys):
    from virnuc_ds.pipeline import runner

    fasta = tmp_path / "in.fa"
    fasta.write_text(">a\n" + "ATG" * 120 + "\n")
    for missing in (False, True):
        monkeypatch.setattr(runner, "missing_bytecode_caches", lambda missing=missing: missing)
        assert run_cli(demo, tmp_path / f"out_{missing}", input_path=fasta) == 0
        err = capsys.readouterr().err
        assert ("no bytecode caches" in err) == missing
        if missing:  # and says what to do
            assert "PYTHONPYCACHEPREFIX" in err and "compileall" in err


def test_model_load_shortens_the_gil_switch_interval_and_restores_it():
    from virnuc_ds.pipeline.embed_part import LOAD_SWITCH_INTERVAL_S, gil_switch_interval

    before = sys.getswitchinterval()
    with pytest.raises(RuntimeError):
        with gil_switch_interval(LOAD_SWITCH_INTERVAL_S):
            assert abs(sys.getswitchinterval() - LOAD_SWITCH_INTERVAL_S) < 1e-9
            raise RuntimeError("a load that fails")
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("value, enabled", [(None, False), ("0", False), ("1", True), (" yes ", True), ("off", False)])
def test_kernel_preload_is_opt_in(value, enabled):
    from virnuc_ds.pipeline.embed_part import preload_kernels_enabled

    assert preload_kernels_enabled({} if value is None else {"VIRNUC_DS_PRELOAD_KERNELS": value}) is enabled


def test_esm2_load_waits_for_the_kernel_preload_before_building(demo, monkeypatch):
    """The embedder is built only after the preload thread's job is done, and the wait is reported."""
    import virnuc_ds.embed.esm2 as esm2_module
    from virnuc_ds.config import Config
    from virnuc_ds.pipeline.embed_part import _load_esm2_embedder

    order = []
    real = esm2_module.Esm2Embedder

    def built(*args, **kwargs):
        order.append("build")
        return real(*args, **kwargs)

    class PreloadJob:
        def result(self):
            order.append("preload done")

    monkeypatch.setattr(esm2_module, "Esm2Embedder", built)
    steps = {}
    _, width = _load_esm2_embedder(Config(), demo["esm2"], torch.device("cpu"), torch.float32, False, steps, PreloadJob())
    assert order == ["preload done", "build"]
    assert "load_kernels_wait" in steps and width > 0


def test_kernels_that_cannot_be_built_fall_back_to_eager_only_when_asked_and_the_report_says_so(demo, monkeypatch):
    import virnuc_ds.embed.esm2 as esm2_module
    from virnuc_ds.config import Config
    from virnuc_ds.errors import VirnucError
    from virnuc_ds.pipeline import embed_part
    from virnuc_ds.report import summarize

    real = esm2_module.Esm2Embedder

    def no_kernels(*args, kernel_inject=False, **kwargs):
        if kernel_inject:
            raise VirnucError("DeepSpeed's transformer_inference op cannot be built: no nvcc")
        return real(*args, **kwargs)

    monkeypatch.setattr(esm2_module, "Esm2Embedder", no_kernels)
    monkeypatch.setattr(embed_part, "_load_kernel_op", lambda device: None)
    cfg = Config()
    with pytest.raises(VirnucError, match="no nvcc"):
        embed_part._load_esm2_embedder(cfg, demo["esm2"], torch.device("cpu"), torch.float32, True, {})
    cfg.esm2.fallback_to_eager = True
    steps = {}
    embedder, width = embed_part._load_esm2_embedder(cfg, demo["esm2"], torch.device("cpu"), torch.float32, True, steps)
    assert steps["esm2_fallback_to_eager"] is True and embedder.embed(["MKV"]).shape == (1, width)
    text = summarize({"ranks": [{"esm2": 1.0}, dict(steps, esm2=1.0)]})
    assert "ESM-2 ran eager on rank(s) 1" in text


def test_a_failing_kernel_preload_is_left_for_the_main_thread(monkeypatch):
    """The preload thread swallows its error: the main thread's own attempt raises and reports it."""
    import virnuc_ds.embed.esm2_kernels as kernels
    from virnuc_ds.pipeline.embed_part import _load_kernel_op

    calls = []

    def broken():
        calls.append("build")
        raise kernels.KernelUnavailableError("no nvcc")

    monkeypatch.setattr(kernels, "prebuild_inference_op", broken)
    assert _load_kernel_op(torch.device("cpu")) is None and calls == ["build"]


def test_results_are_readable_as_the_users_umask_allows(one_rank):
    # temporary files start owner-only (mkstemp); a result renamed from one must not stay so, or the
    # colleagues sharing a project folder cannot read it
    import stat

    from virnuc_ds.atomic import FILE_MODE

    umask = os.umask(0o022)
    os.umask(umask)
    assert FILE_MODE == 0o666 & ~umask
    files = [p for p in one_rank.rglob("*") if p.is_file()]
    assert len(files) > 5
    assert {p.relative_to(one_rank).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.relative_to(one_rank).as_posix(): oct(FILE_MODE) for p in files}


def test_the_same_models_at_another_path_resume_and_other_models_are_refused(demo, one_rank, tmp_path, capsys):
    import yaml

    from virnuc_ds.demo import write_demo_models
    from virnuc_ds.pipeline.fingerprint import MANIFEST

    out = tmp_path / "moved"
    shutil.copytree(one_rank, out)
    moved = shutil.copytree(demo["config"].parent, tmp_path / "scratch" / "models")  # e.g. a node's scratch disk
    capsys.readouterr()
    assert run_cli({"config": moved / demo["config"].name}, out) == 0
    assert "0 to compute" in capsys.readouterr().err
    facts = json.loads((out / MANIFEST).read_text())["facts"]
    assert facts["esm2"]["path"] == str(moved / demo["esm2"].name)  # where they are now
    # another ESM-2 of the same architecture, so of the same file size, is refused
    other = write_demo_models(tmp_path / "other", seed=1)
    assert other["esm2"].stat().st_size == demo["esm2"].stat().st_size
    cfg = yaml.safe_load(demo["config"].read_text())
    cfg["models"] = {"esm2": str(other["esm2"]), "dnabert_s": str(demo["dnabert_s"]), "classifier": str(demo["classifier"])}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    assert run_cli({"config": tmp_path / "other.yaml"}, out) == 1
    assert "holds a run with another esm2;" in capsys.readouterr().err


def test_force_leaves_nothing_of_the_earlier_run(demo, one_rank, tmp_path):
    from virnuc_ds.plot import HISTOGRAM_PNG, PREDICTION_PNG

    out = tmp_path / "forced"
    shutil.copytree(one_rank, out)
    for stale in (PREDICTION_PNG, HISTOGRAM_PNG, "progress/rank7.json"):  # `plot`'s figures, a 8-rank run's progress
        (out / stale).parent.mkdir(exist_ok=True)
        (out / stale).write_text("from an earlier run")
    assert run_cli(demo, out, "--force") == 0
    assert not (out / PREDICTION_PNG).exists() and not (out / HISTOGRAM_PNG).exists()
    assert not (out / "progress" / "rank7.json").exists()


def test_a_frame_with_a_non_finite_embedding_is_listed_as_failed(demo, one_rank, tmp_path, monkeypatch):
    """An embedding that comes back NaN without an error (e.g. an fp16 overflow): the frame is listed
    in failed_files.txt with exit code 2 and the rest completes, as for a frame that raised."""
    from conftest import read_records
    from virnuc_ds.pipeline import embed_part

    victim, protein = read_records(one_rank / "prep" / "identified_protein.faa")[5]
    embed = embed_part.embed_with_oom_retry

    def overflowing(embedder, sequences, stage):
        rows = embed(embedder, sequences, stage)
        if stage == "esm2":
            rows[[k for k, s in enumerate(sequences) if s == protein]] = np.inf
        return rows

    monkeypatch.setattr(embed_part, "embed_with_oom_retry", overflowing)
    out = tmp_path / "overflow"
    assert run_cli(demo, out) == 2
    lines = (out / "failed_files.txt").read_text().splitlines()
    assert lines == [f"{victim}|esm2|the embedding has NaN or Inf values (a dtype overflow? try esm2.dtype / "
                     "dnabert_s.dtype: bf16 or fp32)"]
    assert victim not in read_embeddings(out / "embeddings.h5").ids
    monkeypatch.undo()
    assert run_cli(demo, out) == 0  # the rerun retries it
    assert read_embeddings(out / "embeddings.h5").ids == read_embeddings(one_rank / "embeddings.h5").ids


def test_a_repeated_sigterm_still_lets_the_part_in_flight_finish_and_ctrl_c_stops_now():
    # DeepSpeed's launcher sends SIGTERM to the ranks still running when the first rank stops with
    # exit code 3: that must not cut their parts short
    import signal

    from virnuc_ds.errors import InterruptedRun
    from virnuc_ds.pipeline.runner import StopFlag

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopFlag()
        stop.check(0)  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == "SIGTERM"
        with pytest.raises(InterruptedRun, match="rank 0 stopped by SIGTERM"):
            stop.check(0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_second_run_on_a_folder_in_use_is_refused_and_leaves_it_alone(demo, one_rank, tmp_path, capsys):
    from virnuc_ds.pipeline.output_lock import OutputFolderLock

    out = tmp_path / "busy"
    shutil.copytree(one_rank, out)
    running = OutputFolderLock(out)  # as a run in progress holds it
    running.acquire()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    try:
        capsys.readouterr()
        assert run_cli(demo, out, "--force") == 1
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and f"error: {out} is in use by another virnuc-ds run (pid {os.getpid()} on " in errors[0]
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # --force removed nothing
        assert main(["merge", "-o", str(out), "-c", str(demo["config"])]) == 1  # nor a merge
        assert "is in use by another virnuc-ds run" in capsys.readouterr().err
    finally:
        running.release()
    assert run_cli(demo, out) == 0  # free again: the run resumes


def test_a_broken_gpu_stops_the_rank_instead_of_failing_every_frame(demo, one_rank, tmp_path, monkeypatch, capsys):
    """A sticky CUDA error (an illegal address, a device-side assert) is not the frames' fault: the rank
    stops with exit 1 and a rerun resumes, instead of listing every later frame as failed (exit 2)."""
    from virnuc_ds.pipeline import embed_part

    def broken(embedder, sequences, stage):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")

    monkeypatch.setattr(embed_part, "embed_with_oom_retry", broken)
    out = tmp_path / "broken_gpu"
    capsys.readouterr()
    assert run_cli(demo, out) == 1
    err = capsys.readouterr().err
    assert "error: dnabert_s: the GPU failed (RuntimeError: CUDA error: an illegal memory access was encountered); this rank" in err
    assert not (out / "failed_files.txt").exists() and not list((out / PARTS_DIR).glob("*.failed.txt"))
    monkeypatch.undo()
    assert run_cli(demo, out) == 0
    assert read_embeddings(out / "embeddings.h5").ids == read_embeddings(one_rank / "embeddings.h5").ids


@pytest.mark.parametrize("deleted", [("parts",), ("parts", "embeddings.h5")])
def test_a_finished_result_whose_bulk_was_deleted_is_still_protected(demo, one_rank, tmp_path, capsys, deleted):
    # the parts (and the embeddings) deleted to save space, the predictions kept: another input in that
    # folder is still refused, not taken over as a folder whose run finished nothing
    out = tmp_path / "kept"
    shutil.copytree(one_rank, out)
    for name in deleted:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    before = (out / "prediction_results.txt").read_bytes()
    other = tmp_path / "other.fa"
    other.write_text(">x\n" + "ATG" * 120 + "\n")
    assert run_cli(demo, out, input_path=other) == 1
    assert "holds a run with another input_sha256" in capsys.readouterr().err
    assert (out / "prediction_results.txt").read_bytes() == before


def test_a_run_begun_by_an_earlier_version_resumes(demo, one_rank, tmp_path, capsys):
    """virnuc-ds until 2026-11-29 identified models by path and size: a folder it began, with the same
    files at the same paths, resumes its parts (they carry its fingerprint) instead of being refused."""
    import hashlib

    from virnuc_ds.pipeline.fingerprint import MANIFEST

    out = tmp_path / "earlier"
    shutil.copytree(one_rank, out)
    manifest = json.loads((out / MANIFEST).read_text())
    facts = manifest["facts"]
    esm2, dna = Path(facts["esm2"]["path"]), Path(facts["dnabert_s"]["path"])
    facts["esm2"] = {"path": str(esm2), "size": esm2.stat().st_size}
    facts["dnabert_s"] = {"path": str(dna), "files": {f.name: f.stat().st_size for f in sorted(dna.iterdir())
                                                      if f.suffix in (".json", ".bin", ".safetensors")}}
    earlier = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    (out / MANIFEST).write_text(json.dumps({"fingerprint": earlier, "facts": facts}))
    parts = sorted((out / PARTS_DIR).glob("part-*.h5"))
    for part in parts:
        with h5py.File(part, "a") as f:
            f.attrs["fingerprint"] = earlier
    parts[0].unlink()  # the earlier version was stopped before this part
    (out / "embeddings.h5").unlink()
    capsys.readouterr()
    assert run_cli(demo, out) == 0
    assert "1 to compute" in capsys.readouterr().err
    assert json.loads((out / MANIFEST).read_text())["fingerprint"] == earlier
    np.testing.assert_array_equal(read_embeddings(out / "embeddings.h5").features(),
                                  read_embeddings(one_rank / "embeddings.h5").features())
