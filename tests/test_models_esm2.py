"""ESM-2: loading fair-esm checkpoints and the pooled embeddings, on a tiny model in the real format."""

import random
import sys
import types

import numpy as np
import pytest
import torch

from virnuc_ds.embed.esm2 import (Esm2Embedder, RotaryEmbeddingFp32Tables, eager_encoder,
                                  esm2_token_count, plan_token_batches)
from virnuc_ds.errors import ConfigError, ModelNotFoundError
from virnuc_ds.models.demo import write_tiny_esm2
from virnuc_ds.models.esm2 import load_esm2, resolve_esm2_checkpoint

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def random_proteins(count, low, high, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(low, high)))
            for _ in range(count)]


def fair_esm_one_at_a_time(checkpoint, proteins, max_residues=1024):
    """The original's computation: fair-esm's batch converter and forward, one protein a batch."""
    model, alphabet = load_esm2(checkpoint)
    converter = alphabet.get_batch_converter(truncation_seq_length=max_residues)
    rows = []
    with torch.no_grad():
        for protein in proteins:
            _, _, tokens = converter([("p", protein)])
            reps = model(tokens, repr_layers=[model.num_layers])["representations"][model.num_layers]
            rows.append(reps[0, 1:min(len(protein), max_residues) + 1].mean(0))
    return torch.stack(rows)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_esm2(tmp_path_factory.mktemp("esm2"), seed=0)


@pytest.fixture(scope="module")
def proteins():
    return random_proteins(24, 1, 80)  # unsorted lengths


@pytest.fixture(scope="module")
def reference(checkpoint, proteins):
    return fair_esm_one_at_a_time(checkpoint, proteins)


def test_tiny_checkpoint_loads_with_fair_esm_loader(checkpoint):
    from esm.model.esm2 import ESM2

    assert checkpoint.name.startswith("esm2") and checkpoint.suffix == ".pt"
    model, alphabet = load_esm2(checkpoint)
    assert isinstance(model, ESM2) and not model.training
    assert (model.num_layers, model.embed_dim, model.attention_heads) == (2, 32, 4)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    saved = torch.load(checkpoint, weights_only=False)["model"]
    assert torch.equal(model.embed_tokens.weight, saved["encoder.sentence_encoder.embed_tokens.weight"])
    assert torch.equal(model.lm_head.dense.weight, saved["encoder.lm_head.dense.weight"])
    assert alphabet.padding_idx == 1 and alphabet.cls_idx == 0 and alphabet.eos_idx == 2


def test_checkpoint_is_deterministic_for_a_seed(tmp_path):
    a = torch.load(write_tiny_esm2(tmp_path / "a", seed=3), weights_only=False)["model"]
    b = torch.load(write_tiny_esm2(tmp_path / "b", seed=3), weights_only=False)["model"]
    c = torch.load(write_tiny_esm2(tmp_path / "c", seed=4), weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.lm_head.dense.weight"], c["encoder.lm_head.dense.weight"])


def test_contact_regression_file_is_optional_and_loaded_when_present(tmp_path):
    path = write_tiny_esm2(tmp_path, seed=1, contact_regression=True)
    regression = torch.load(path.with_name(path.stem + "-contact-regression.pt"))["model"]
    model, _ = load_esm2(path)
    assert torch.equal(model.contact_head.regression.weight, regression["contact_head.regression.weight"])


def test_not_an_esm2_checkpoint_is_a_config_error(tmp_path):
    path = tmp_path / "esm2_bad.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ConfigError):
        load_esm2(path)


def test_bare_name_is_found_in_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write_tiny_esm2(tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t2_demo.pt")
    assert resolve_esm2_checkpoint("esm2_t2_demo") == path
    assert resolve_esm2_checkpoint("esm2_t2_demo.pt") == path
    model, _ = load_esm2("esm2_t2_demo")
    assert model.num_layers == 2


def test_missing_checkpoint_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError) as error:
        load_esm2("esm2_t36_3B_UR50D")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t36_3B_UR50D.pt"
    assert str(expected) in str(error.value) and str(expected) in error.value.searched
    assert str(tmp_path / "home" / ".cache" / "torch" / "hub" / "checkpoints") in str(error.value)
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        load_esm2(tmp_path / "nowhere" / "esm2_t36_3B_UR50D.pt")


def test_embeddings_equal_fair_esm_one_at_a_time(checkpoint, proteins, reference):
    model, alphabet = load_esm2(checkpoint)
    embedder = Esm2Embedder(model, alphabet, toks_per_batch=256)
    out = embedder.embed(proteins)
    assert out.shape == (len(proteins), 32) and out.dtype == torch.float32
    assert out.device.type == "cpu"
    assert (out - reference).abs().max() <= 1e-5
    assert embedder.truncated_count == 0


@pytest.mark.parametrize("toks_per_batch", [1, 40, 333, 65536])
def test_embeddings_do_not_depend_on_token_budget(checkpoint, proteins, reference, toks_per_batch):
    model, alphabet = load_esm2(checkpoint)
    out = Esm2Embedder(model, alphabet, toks_per_batch=toks_per_batch).embed(proteins)
    assert cosine(out, reference).min() >= 0.99999
    assert (out - reference).abs().max() <= 1e-5


def test_long_proteins_are_truncated_and_counted(checkpoint):
    proteins = random_proteins(6, 4, 12, seed=5) + random_proteins(3, 20, 40, seed=6)
    model, alphabet = load_esm2(checkpoint)
    embedder = Esm2Embedder(model, alphabet, max_residues=15)
    out = embedder.embed(proteins)
    assert embedder.truncated_count == 3
    assert embedder.token_lengths(proteins).tolist() == [min(len(p), 15) + 2 for p in proteins]
    expected = fair_esm_one_at_a_time(checkpoint, [p[:15] for p in proteins])
    assert (out - expected).abs().max() <= 1e-5
    embedder.embed(proteins[-1:])
    assert embedder.truncated_count == 4  # counts accumulate across calls


def test_token_count_includes_bos_and_eos():
    assert esm2_token_count("MKV") == 5
    assert esm2_token_count("M" * 2000) == 1026  # the original keeps 1024 residues


def test_token_batches_respect_the_budget():
    counts = [5, 90, 17, 17, 3, 250, 40, 41, 8]
    for budget in (1, 50, 100, 300, 10_000):
        batches = plan_token_batches(counts, budget)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(counts)))
        for batch in batches:
            padded = len(batch) * max(counts[i] for i in batch)
            assert padded <= budget or len(batch) == 1


def test_empty_or_unknown_residues_are_clear_errors(checkpoint):
    model, alphabet = load_esm2(checkpoint)
    embedder = Esm2Embedder(model, alphabet, use_deepspeed=False)
    with pytest.raises(ValueError, match="empty"):
        embedder.embed(["MKV", ""])
    with pytest.raises(ValueError, match="not an ESM-2 token"):
        embedder.embed(["MKJV"])


def test_residue_ids_match_fair_esm_alphabet(checkpoint):
    model, alphabet = load_esm2(checkpoint)
    embedder = Esm2Embedder(model, alphabet, use_deepspeed=False)
    for protein in random_proteins(5, 1, 30, seed=9) + ["XBUZO", "MK<mask>V"]:
        assert embedder.residue_ids(protein).tolist() == alphabet.encode(protein)


def test_deepspeed_wrapper_gives_the_same_result(checkpoint, proteins, reference):
    from virnuc_ds.embed.esm2 import deepspeed_inference_engine

    model, _ = load_esm2(checkpoint)
    engine = deepspeed_inference_engine(model, torch.float32)
    assert type(engine).__name__ == "InferenceEngine"  # DeepSpeed's CPU accelerator works here
    model, alphabet = load_esm2(checkpoint)
    wrapped = Esm2Embedder(model, alphabet, use_deepspeed=True)
    assert type(wrapped.encoder.runner).__name__ == "InferenceEngine"  # the forward goes through DeepSpeed
    assert (wrapped.embed(proteins) - reference).abs().max() <= 1e-5
    model, alphabet = load_esm2(checkpoint)
    plain = Esm2Embedder(model, alphabet, use_deepspeed=False).embed(proteins)
    assert (plain - reference).abs().max() <= 1e-5


def test_rotary_tables_stay_fp32_and_match_fair_esm_in_fp32(checkpoint):
    from esm.rotary_embedding import RotaryEmbedding

    q, k = torch.randn(3, 300, 8), torch.randn(3, 300, 8)
    ours, theirs = RotaryEmbeddingFp32Tables(dim=8)(q, k), RotaryEmbedding(dim=8)(q, k)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    model, _ = load_esm2(checkpoint)
    eager_encoder(model, dtype=torch.bfloat16, device=torch.device("cpu"), use_deepspeed=False)
    assert all(layer.self_attn.rot_emb.inv_freq.dtype == torch.float32 for layer in model.layers)


def test_bf16_on_cpu_is_close_to_fp32(checkpoint, proteins, reference):
    model, alphabet = load_esm2(checkpoint)
    out = Esm2Embedder(model, alphabet, dtype=torch.bfloat16).embed(proteins)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cosine(out, reference).min() >= 0.9999  # DESIGN's bf16 gate holds on the tiny model too
    assert ((out - reference).norm(dim=1) / reference.norm(dim=1)).max() <= 1e-2


def test_kernel_inject_uses_the_kernel_encoder_and_ignores_padding_rows(
        checkpoint, proteins, reference, monkeypatch):
    calls = {}

    def build_kernel_encoder(model, alphabet, *, dtype, device, max_tokens, max_len, attention="deepspeed"):
        calls.update(dtype=dtype, device=device, max_tokens=max_tokens, max_len=max_len)
        eager = eager_encoder(model, dtype=dtype, device=device, use_deepspeed=False)

        def encode(tokens):
            reps = eager(tokens).clone()
            reps[tokens.eq(alphabet.padding_idx)] = float("nan")  # pad rows are unspecified
            return reps

        return encode

    fake = types.ModuleType("virnuc_ds.embed.esm2_kernels")
    fake.build_kernel_encoder = build_kernel_encoder
    monkeypatch.setitem(sys.modules, "virnuc_ds.embed.esm2_kernels", fake)
    model, alphabet = load_esm2(checkpoint)
    out = Esm2Embedder(model, alphabet, kernel_inject=True, toks_per_batch=500).embed(proteins)
    assert calls == {"dtype": torch.float32, "device": torch.device("cpu"), "max_tokens": 500,
                     "max_len": 1026}
    assert (out - reference).abs().max() <= 1e-5


def test_skipping_weight_init_in_overlapping_threads_restores_torch_init():
    """ESM-2 and DNABERT-S are built side by side: the last thread out puts torch.nn.init back."""
    import threading

    from virnuc_ds.models.esm2 import skip_weight_init

    inside, release = threading.Event(), threading.Event()

    def hold():
        with skip_weight_init():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(10)
    with skip_weight_init():
        t = torch.zeros(64)
        torch.nn.init.normal_(t)
        assert not t.any()  # skipped while both are inside
    release.set()
    thread.join()
    torch.nn.init.normal_(t)
    assert t.any()  # restored
