"""The whole pipeline on a GPU: DeepSpeed kernels in bf16 against the fp32 CPU path, and classify on CUDA."""

import pytest
import torch
import yaml

from conftest import GOLDEN, SAMPLE, cosine_rows
from virnuc_ds.cli import main
from virnuc_ds.store.embeddings import read_embeddings

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    """A small ESM-2 the kernels accept (head size 32), the demo DNABERT-S and a matching classifier."""
    from virnuc_ds.classify.mlp import MLPClassifier, save_original_style
    from virnuc_ds.models.demo import write_tiny_dnabert_s, write_tiny_esm2

    d = tmp_path_factory.mktemp("gpu_models")
    esm = write_tiny_esm2(d / "esm2_t4_gpu.pt", seed=3, num_layers=4, embed_dim=256, attention_heads=8, init_std=0.02)
    write_tiny_dnabert_s(d / "dnabert", seed=3, init_std=0.02)
    hidden = yaml.safe_load((d / "dnabert" / "config.json").read_text())["hidden_size"]
    torch.manual_seed(0)
    save_original_style(MLPClassifier(hidden + 256, 16, 2).eval(), d / "clf.pth")
    cfg = {"models": {"esm2": str(esm), "dnabert_s": str(d / "dnabert"), "classifier": str(d / "clf.pth")}, "run": {"frames_per_part": 32}}
    (d / "gpu.yaml").write_text(yaml.safe_dump(cfg))
    return d / "gpu.yaml"


@pytest.mark.parametrize("attention", ["deepspeed", "sdpa"])
def test_kernels_bf16_match_fp32_cpu(gpu_models, tmp_path, attention):
    cfg = yaml.safe_load(gpu_models.read_text())
    cfg["esm2"] = {"attention": attention}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", "-c", str(tmp_path / "c.yaml"), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "gpu")]) == 0
    assert main(["run", "-c", str(gpu_models), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "cpu"), "--cpu"]) == 0
    g, c = read_embeddings(tmp_path / "gpu" / "embeddings.h5"), read_embeddings(tmp_path / "cpu" / "embeddings.h5")
    assert g.ids == c.ids
    assert "bfloat16" in g.attrs["dtype"] and "float32" in c.attrs["dtype"]
    import numpy as np

    for fast, ref in ((g.esm2, c.esm2), (g.dnabert_s, c.dnabert_s)):  # DESIGN's bf16 gate, per frame
        assert cosine_rows(fast, ref).min() >= 0.9999
        assert (np.linalg.norm(fast - ref, axis=1) / np.linalg.norm(ref, axis=1)).max() <= 1e-2
    labels = lambda p: [r.split("\t")[1] for r in (p / "prediction_results.txt").read_text().splitlines()[1:]]
    agree = sum(a == b for a, b in zip(labels(tmp_path / "gpu"), labels(tmp_path / "cpu"))) / len(g.ids)
    assert agree >= 0.999


def test_classify_on_cuda_against_golden(tmp_path):
    """On CUDA as on the CPU: labels and the highest-score file identical, scores to float32 rounding.

    (The golden scores' last bits match neither this machine's CPU nor an H200's cuBLAS: measured
    on both, benchmarks/results/gpu_pytest_x2_run1.txt.)"""
    import numpy as np

    p = GOLDEN / "predict"
    main(["import-legacy", "--dnabert", str(p / "output_1_DNABERT_S.pt"), "--esm", str(p / "output_1_ESM.pt"), "-o", str(tmp_path / "e.h5")])
    assert main(["classify", "-e", str(tmp_path / "e.h5"), "-p", str(p / "model.pth"), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 0
    name = "prediction_results_highestscore.csv"
    assert (tmp_path / "o" / name).read_bytes() == (p / name).read_bytes()
    rows = lambda f: [line.split("\t") for line in f.read_text().splitlines()[1:]]
    mine, theirs = rows(tmp_path / "o" / "prediction_results.txt"), rows(p / "prediction_results.txt")
    assert [r[:2] for r in mine] == [r[:2] for r in theirs]
    np.testing.assert_allclose(np.array([r[2:] for r in mine], float), np.array([r[2:] for r in theirs], float), atol=2e-6, rtol=0)


def test_out_of_memory_on_the_gpu_is_split_and_retried(gpu_models, tmp_path, capfd, monkeypatch):
    """Measure the GPU memory a run with small batches and one with large batches need, cap this
    process between the two, run the large batches under the cap: the run completes, logs the
    retries, and equals the small-batch run. In this process, on one GPU (`--gpus 0`): on a machine of
    several, a plain run would start a rank per GPU under the launcher, out of this process's sight."""
    import os

    # --gpus 0 sets CUDA_VISIBLE_DEVICES in this process: the later tests get it back as it was
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"])
    else:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = yaml.safe_load(gpu_models.read_text())
    cfg["esm2"] = {"toks_per_batch": 1 << 22, "replace_with_kernel_inject": False, "dtype": "bf16"}
    cfg["dnabert_s"] = {"toks_per_batch": 1 << 22}
    cfg["run"]["frames_per_part"] = 1 << 20  # one part: a batch never spans parts, so parts cap batches
    (tmp_path / "big_batches.yaml").write_text(yaml.safe_dump(cfg))
    cfg["esm2"]["toks_per_batch"] = cfg["dnabert_s"]["toks_per_batch"] = 4096
    (tmp_path / "small_batches.yaml").write_text(yaml.safe_dump(cfg))
    records = SAMPLE.read_text().split(">")[1:]
    big = tmp_path / "big.fa"  # the sample 30 times over (new ids): large batches are large
    big.write_text("".join(f">c{k}_{rec}" for k in range(30) for rec in records))
    args = ["-i", str(big), "-m", "500", "--gpus", "0"]

    def peak_of_run(config: str, out: str) -> int:
        """GPU memory the run's tensors took at most beyond what this process already held (earlier
        tests may). Allocated, not reserved: under a cap the allocator frees its cache and retries
        before it gives up, so only the tensors' own peak decides whether a batch fits."""
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        assert main(["run", "-c", str(tmp_path / config), *args, "-o", str(tmp_path / out)]) == 0
        peak = torch.cuda.max_memory_allocated() - held
        torch.cuda.empty_cache()
        return peak

    small = peak_of_run("small_batches.yaml", "ref")
    large = peak_of_run("big_batches.yaml", "uncapped")
    assert large > small + 64 * 2**20, f"large batches need no more memory than small ones ({large} vs {small} bytes)"
    capfd.readouterr()
    total = torch.cuda.get_device_properties(0).total_memory
    cap = torch.cuda.memory_reserved() + (small + large) // 2
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        assert main(["run", "-c", str(tmp_path / "big_batches.yaml"), *args, "-o", str(tmp_path / "capped")]) == 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "out of GPU memory; retrying with" in capfd.readouterr().err
    a, b = read_embeddings(tmp_path / "ref" / "embeddings.h5"), read_embeddings(tmp_path / "capped" / "embeddings.h5")
    assert a.ids == b.ids and cosine_rows(a.esm2, b.esm2).min() >= 0.9999
    assert cosine_rows(a.dnabert_s, b.dnabert_s).min() >= 0.9999


@pytest.mark.parametrize("attention", ["deepspeed", "sdpa"])
def test_two_ranks_on_a_gpu_load_their_models_early_and_match_one_rank(gpu_models, tmp_path, attention):
    """Two ranks (sharing this GPU when it is the only one) started as the deepspeed launcher starts
    them: each builds its kernels in the early-load thread and runs them from the main thread. Same
    embeddings (bf16 either way: to rounding) and identical labels as one rank, with either attention."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load(gpu_models.read_text())
    cfg["esm2"] = {"attention": attention}
    gpu_models = tmp_path / f"{attention}.yaml"
    gpu_models.write_text(yaml.safe_dump(cfg))
    assert main(["run", "-c", str(gpu_models), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "one")]) == 0
    base = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""), WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29781")
    cmd = [sys.executable, "-m", "virnuc_ds.run", "-c", str(gpu_models), "-i", str(SAMPLE), "-m", "500", "-o", str(tmp_path / "two")]
    ranks = [subprocess.Popen(cmd, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    report = json.loads((tmp_path / "two" / "run_report.json").read_text())
    assert all("model_load_wait" in r for r in report["ranks"])
    assert report["dtypes"]["kernels"] and f"deepspeed-{attention}" in (tmp_path / "two" / "run_manifest.json").read_text()
    a, b = read_embeddings(tmp_path / "one" / "embeddings.h5"), read_embeddings(tmp_path / "two" / "embeddings.h5")
    assert a.ids == b.ids
    assert cosine_rows(a.esm2, b.esm2).min() >= 0.9999 and cosine_rows(a.dnabert_s, b.dnabert_s).min() >= 0.9999
    labels = lambda p: [r.split("\t")[:2] for r in (p / "prediction_results.txt").read_text().splitlines()]
    assert labels(tmp_path / "one") == labels(tmp_path / "two")
