"""ESM-2 on DeepSpeed's inference kernels against fair-esm fp32 (virnuc_ds.embed.esm2_kernels).

The GPU tests need CUDA and build DeepSpeed's transformer_inference op (about 45 s the first time
on a machine); without CUDA they are skipped with the reason shown. A small random ESM-2 (6 layers,
320 wide, 5 heads of 64 like the 3B model's) is compared with fair-esm fp32 on the same weights:
pooled-embedding cosine >= 0.9999 per protein (the project's bf16 gate), padded batches included.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

esm = pytest.importorskip("esm")
kernels = pytest.importorskip("virnuc_ds.embed.esm2_kernels")

CUDA = torch.cuda.is_available()
needs_gpu = [pytest.mark.gpu,
             pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU for DeepSpeed's "
                                "transformer_inference kernels (run through device)")]
COSINE_GATE = 0.9999
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def random_proteins(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [AMINO[rng.integers(0, 20, size=n)].tobytes().decode() for n in lengths]


def tokens_of(alphabet, proteins):
    _, _, tokens = alphabet.get_batch_converter()([(str(i), p) for i, p in enumerate(proteins)])
    return tokens  # [B, T]: BOS, residues, EOS, right padding


def pooled(reps, proteins):
    """Mean over residue positions 1..len -> [B, E] float64 on CPU."""
    return torch.stack([reps[i, 1:len(p) + 1].double().mean(0) for i, p in enumerate(proteins)]).cpu()


def min_cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()


@pytest.fixture(scope="module")
def small_esm2():
    torch.manual_seed(0)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = esm.model.esm2.ESM2(num_layers=6, embed_dim=320, attention_heads=5, alphabet=alphabet)
    return model.eval().requires_grad_(False), alphabet


@pytest.fixture(scope="module")
def encoder(small_esm2):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    model, alphabet = small_esm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = kernels.build_kernel_encoder(model, alphabet, dtype=torch.bfloat16, device="cuda",
                                       max_tokens=8192)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "caller's model was modified"
    return enc


@torch.inference_mode()
def fp32_reps(model, tokens):
    model = model.cuda()
    return model(tokens.cuda(), repr_layers=[model.num_layers])["representations"][model.num_layers]


@pytest.mark.usefixtures("encoder")
class TestAgainstFairEsmFp32:
    pytestmark = needs_gpu

    def test_equal_lengths_no_padding(self, small_esm2, encoder):
        model, alphabet = small_esm2
        proteins = random_proteins([150] * 8, seed=1)
        tokens = tokens_of(alphabet, proteins)
        got = encoder(tokens.cuda())
        assert got.shape == (8, 152, 320) and got.dtype == torch.float32
        want = fp32_reps(model, tokens)
        assert min_cosine(pooled(got, proteins), pooled(want, proteins)) >= COSINE_GATE
        rel = ((got - want).norm() / want.norm()).item()  # every position, not just pooled
        assert rel < 1e-2

    def test_padded_batch_matches_each_protein_alone(self, small_esm2, encoder):
        model, alphabet = small_esm2
        proteins = random_proteins([1022, 700, 301, 166, 100, 50, 49, 30, 7, 1], seed=2)
        got = pooled(encoder(tokens_of(alphabet, proteins).cuda()), proteins)
        alone = torch.cat([pooled(fp32_reps(model, tokens_of(alphabet, [p])), [p])
                           for p in proteins])
        cosines = torch.nn.functional.cosine_similarity(got, alone, dim=1)
        assert cosines.min().item() >= COSINE_GATE, cosines.tolist()
        rel_l2 = (got - alone).norm(dim=1) / alone.norm(dim=1)
        assert rel_l2.max().item() <= 1e-2

    def test_batch_composition_does_not_change_results(self, small_esm2, encoder):
        _, alphabet = small_esm2
        proteins = random_proteins([120, 166, 100, 140], seed=3)
        batch = pooled(encoder(tokens_of(alphabet, proteins).cuda()), proteins)
        alone = torch.cat([pooled(encoder(tokens_of(alphabet, [p]).cuda()), [p]) for p in proteins])
        assert min_cosine(batch, alone) >= COSINE_GATE

    def test_mask_tokens_follow_token_dropout_scaling(self, small_esm2, encoder):
        model, alphabet = small_esm2
        proteins = random_proteins([80, 60], seed=4)
        tokens = tokens_of(alphabet, proteins)
        tokens[0, 5:9] = alphabet.mask_idx  # mask_ratio_observed = 4/82 on row 0
        got, want = encoder(tokens.cuda()), fp32_reps(model, tokens)
        assert min_cosine(pooled(got, proteins), pooled(want, proteins)) >= COSINE_GATE

    def test_batch_over_budget_is_split_by_rows(self, small_esm2, encoder):
        model, alphabet = small_esm2
        proteins = random_proteins([200] * 50, seed=5)  # 50 x 202 tokens > max_tokens 8192
        tokens = tokens_of(alphabet, proteins)
        got = pooled(encoder(tokens.cuda()), proteins)
        want = pooled(fp32_reps(model, tokens), proteins)
        assert min_cosine(got, want) >= COSINE_GATE

    def test_input_tokens_untouched_and_outputs_finite(self, small_esm2, encoder):
        _, alphabet = small_esm2
        proteins = random_proteins([90, 45], seed=6)
        tokens = tokens_of(alphabet, proteins).cuda()
        copy = tokens.clone()
        reps = encoder(tokens)
        assert torch.equal(tokens, copy)
        assert torch.isfinite(reps[0]).all() and torch.isfinite(reps[1, :47]).all()

    def test_workspace_was_sized_and_logged(self, encoder):
        memory = encoder.memory
        assert memory["workspace_bytes"] > 0 and memory["weights_bytes"] > 0
        rows, length = memory["workspace_shape"]
        assert rows * length <= max(8192, length)

    def test_too_long_batch_is_a_clear_error(self, small_esm2, encoder):
        _, alphabet = small_esm2
        with pytest.raises(ValueError, match="max_len"):
            encoder(torch.full((1, 1100), alphabet.cls_idx, dtype=torch.long, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_sdpa_attention_variant_matches_fp32(small_esm2, encoder):
    model, alphabet = small_esm2
    sdpa = kernels.build_kernel_encoder(model, alphabet, dtype=torch.bfloat16, device="cuda",
                                        max_tokens=8192, attention="sdpa")
    proteins = random_proteins([1022, 300, 166, 120, 49, 5], seed=7)
    tokens = tokens_of(alphabet, proteins)
    got = pooled(sdpa(tokens.cuda()), proteins)
    want = pooled(fp32_reps(model, tokens), proteins)
    assert min_cosine(got, want) >= COSINE_GATE
    assert min_cosine(got, pooled(encoder(tokens.cuda()), proteins)) >= COSINE_GATE


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_head_size_16_is_refused(small_esm2):
    alphabet = small_esm2[1]
    tiny = esm.model.esm2.ESM2(num_layers=1, embed_dim=320, attention_heads=20, alphabet=alphabet)
    with pytest.raises(kernels.KernelUnavailableError, match="head size 16"):
        kernels.build_kernel_encoder(tiny, alphabet, max_tokens=4096)


# --- pure Python parts: run everywhere -------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    ("9.0a", "9.0"), ("8.0;9.0a+PTX", "8.0;9.0+PTX"), ("8.0 8.6 9.0", "8.0;8.6;9.0"),
    ("10.0f", "10.0"), ("9.0", "9.0")])
def test_arch_list_normalised_for_deepspeed(given, expected):
    env = {"TORCH_CUDA_ARCH_LIST": given}
    assert kernels.normalise_cuda_arch_list(env) == expected
    assert env["TORCH_CUDA_ARCH_LIST"] == expected


def test_bad_arch_entry_is_a_clear_error():
    with pytest.raises(kernels.KernelUnavailableError, match="sm_90"):
        kernels.normalise_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "sm_90"})


def test_rows_per_call_respects_budget_and_int32_scores():
    assert kernels.max_rows_per_call(65536, 40, 170) == 385
    assert kernels.max_rows_per_call(65536, 40, 1024) == 51  # 51*40*1024^2 < 2^31 < 52*...
    assert kernels.max_rows_per_call(512, 40, 1024) == 1  # one long protein always runs
    for length in (2, 52, 170, 500, 1024):
        rows = kernels.max_rows_per_call(65536, 40, length)
        assert rows == 1 or (rows * length <= 65536 and rows * 40 * length**2 < 2**31)


def test_error_is_a_virnuc_error():
    from virnuc_ds.errors import VirnucError

    assert issubclass(kernels.KernelUnavailableError, VirnucError)


def test_without_cuda_the_error_says_so(small_esm2, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(kernels.KernelUnavailableError, match="CUDA"):
        kernels.prebuild_inference_op()


def test_policy_exposes_fair_esm_weights(small_esm2):
    model, _ = small_esm2
    layer = model.layers[0]
    policy = kernels.ESM2LayerPolicy(layer)
    assert policy.get_hidden_heads() == (320, 5, layer.self_attn_layer_norm.eps, 1280)
    qkvw, qkvb, out_w, out_b = policy.attention()
    assert qkvw.shape == (960, 320) and qkvb.shape == (960,)
    assert torch.equal(qkvw[320:640], layer.self_attn.k_proj.weight)
    assert out_w is layer.self_attn.out_proj.weight
    fc1_w, _, fc2_w, _ = policy.mlp()
    assert fc1_w.shape == (1280, 320) and fc2_w.shape == (320, 1280)
    attn_nw, _, input_nw, _ = policy.layernorm()
    assert attn_nw is layer.final_layer_norm.weight and input_nw is layer.self_attn_layer_norm.weight


if os.environ.get("VIRNUC_GPU_TEST_DEBUG"):  # pragma: no cover
    import logging

    logging.basicConfig(level=logging.INFO)
