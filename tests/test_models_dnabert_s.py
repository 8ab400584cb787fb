"""DNABERT-S: the native model, its loading from a model folder, and the pooled embeddings."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from virnuc_ds.embed.dnabert_s import DnabertSEmbedder
from virnuc_ds.errors import ConfigError, ModelNotFoundError
from virnuc_ds.models.demo import write_tiny_dnabert_s
from virnuc_ds.models.dnabert_s import DnabertSConfig, alibi_slopes, load_dnabert_s

SPECIAL_IDS = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4}


def random_dna(count, low, high, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice("ACGT") for _ in range(rng.randint(low, high))) for _ in range(count)]


def cosine(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=1)


def reference_last_hidden(state, config, ids):
    """The original's PyTorch attention path, written out for one unpadded sequence."""
    H, N, I = config.hidden_size, config.num_attention_heads, config.intermediate_size
    D, T, eps = H // N, len(ids), config.layer_norm_eps
    x = state["embeddings.word_embeddings.weight"][ids] + state["embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (H,), state["embeddings.LayerNorm.weight"], state["embeddings.LayerNorm.bias"], eps)
    slopes = torch.tensor(alibi_slopes(N))
    distance = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).abs()
    bias = slopes[:, None, None] * -distance  # [N, T, T]
    for n in range(config.num_hidden_layers):
        p = f"encoder.layer.{n}."
        qkv = x @ state[p + "attention.self.Wqkv.weight"].T + state[p + "attention.self.Wqkv.bias"]
        qkv = qkv.view(T, 3, N, D)
        q, k, v = qkv[:, 0].permute(1, 0, 2), qkv[:, 1].permute(1, 2, 0), qkv[:, 2].permute(1, 0, 2)
        probs = torch.softmax(q @ k / math.sqrt(D) + bias, dim=-1)
        context = (probs @ v).permute(1, 0, 2).reshape(T, H)
        x = F.layer_norm(context @ state[p + "attention.output.dense.weight"].T
                         + state[p + "attention.output.dense.bias"] + x, (H,),
                         state[p + "attention.output.LayerNorm.weight"],
                         state[p + "attention.output.LayerNorm.bias"], eps)
        h = x @ state[p + "mlp.gated_layers.weight"].T
        h = F.gelu(h[:, :I]) * h[:, I:]
        x = F.layer_norm(h @ state[p + "mlp.wo.weight"].T + state[p + "mlp.wo.bias"] + x, (H,),
                         state[p + "mlp.layernorm.weight"], state[p + "mlp.layernorm.bias"], eps)
    return x


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_dnabert_s(tmp_path_factory.mktemp("dnabert_s"), seed=0)


@pytest.fixture(scope="module")
def sequences():
    return random_dna(20, 1, 400)  # unsorted lengths


@pytest.fixture(scope="module")
def one_at_a_time(folder, sequences):
    embedder = DnabertSEmbedder(*load_dnabert_s(folder))
    return torch.cat([embedder.embed([s]) for s in sequences])


def test_alibi_slopes_are_mosaicbert_slopes():
    assert alibi_slopes(12) == pytest.approx(
        [2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)], rel=1e-12)
    assert alibi_slopes(8) == pytest.approx([2.0 ** -e for e in range(1, 9)], rel=1e-12)
    assert alibi_slopes(4) == pytest.approx([2.0 ** -e for e in (2, 4, 6, 8)], rel=1e-12)


def test_folder_has_real_files_and_config_keys(folder):
    assert {p.name for p in folder.iterdir()} == {"config.json", "tokenizer.json", "model.safetensors"}
    raw = json.loads((folder / "config.json").read_text())
    for key in ("alibi_starting_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "vocab_size", "type_vocab_size", "layer_norm_eps", "auto_map"):
        assert key in raw
    config = DnabertSConfig.from_json_file(folder / "config.json")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 48, 4)


def test_folder_is_deterministic_for_a_seed(tmp_path):
    a, b = write_tiny_dnabert_s(tmp_path / "a", seed=2), write_tiny_dnabert_s(tmp_path / "b", seed=2)
    c = write_tiny_dnabert_s(tmp_path / "c", seed=3)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_weights_load_strictly_with_real_names(folder):
    model, _ = load_dnabert_s(folder)
    saved = load_file(str(folder / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    for key in ("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
                "encoder.layer.1.attention.self.Wqkv.bias", "encoder.layer.0.mlp.gated_layers.weight",
                "encoder.layer.0.attention.output.LayerNorm.weight", "pooler.dense.weight"):
        assert key in saved
    assert "encoder.layer.0.mlp.gated_layers.bias" not in saved
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("change", ["missing", "unexpected", "wrong_shape"])
def test_mismatched_weights_fail(folder, tmp_path, change):
    bad = write_tiny_dnabert_s(tmp_path / "bad", seed=0)
    state = load_file(str(bad / "model.safetensors"))
    if change == "missing":
        del state["encoder.layer.1.mlp.wo.weight"]
    elif change == "unexpected":
        state["encoder.layer.0.attention.self.Wq.weight"] = torch.zeros(48, 48)
    else:
        state["encoder.layer.0.mlp.wo.weight"] = torch.zeros(48, 95)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_dnabert_s(bad)


def test_bert_prefixed_bin_weights_load_and_agree(folder, tmp_path, sequences, one_at_a_time):
    prefixed = write_tiny_dnabert_s(tmp_path / "bin", seed=0, weights_format="bin", key_prefix="bert.")
    assert (prefixed / "pytorch_model.bin").is_file()
    assert not (prefixed / "model.safetensors").exists()
    assert all(k.startswith("bert.") for k in torch.load(prefixed / "pytorch_model.bin"))
    out = DnabertSEmbedder(*load_dnabert_s(prefixed)).embed(sequences)
    assert torch.equal(out, DnabertSEmbedder(*load_dnabert_s(folder)).embed(sequences))
    plain_bin = write_tiny_dnabert_s(tmp_path / "plain_bin", seed=0, weights_format="bin")
    assert torch.equal(DnabertSEmbedder(*load_dnabert_s(plain_bin)).embed(sequences), out)


def test_masked_lm_head_in_checkpoint_is_ignored(tmp_path):
    folder = write_tiny_dnabert_s(tmp_path, seed=0, key_prefix="bert.")
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}  # MLM: no pooler
    state["cls.predictions.bias"] = torch.zeros(256)
    save_file(state, str(folder / "model.safetensors"))
    model, _ = load_dnabert_s(folder)
    assert model.pooler is None


def test_missing_folder_or_files_name_what_was_sought(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ModelNotFoundError, match="tokenizer.json") as error:
        load_dnabert_s(tmp_path / "absent")
    assert str(tmp_path / "absent") in error.value.searched
    folder = write_tiny_dnabert_s(tmp_path / "partial", seed=0)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match="partial"):
        load_dnabert_s(folder)
    with pytest.raises(ModelNotFoundError) as error:
        load_dnabert_s("zhihan1996/DNABERT-S")
    assert str(tmp_path / "hf" / "hub" / "models--zhihan1996--DNABERT-S") in str(error.value)


def test_hugging_face_cache_snapshot_is_found(tmp_path, monkeypatch):
    repo = tmp_path / "hf" / "hub" / "models--zhihan1996--DNABERT-S"
    write_tiny_dnabert_s(repo / "snapshots" / "0123abcd", seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name in ("zhihan1996/DNABERT-S", None, repo):
        model, tokenizer = load_dnabert_s(name)
        assert model.config.hidden_size == 48 and tokenizer.token_to_id("[CLS]") == 1


def test_tokenizer_special_ids_and_template(folder):
    _, tokenizer = load_dnabert_s(folder)
    assert {t: tokenizer.token_to_id(t) for t in SPECIAL_IDS} == SPECIAL_IDS
    encoding = tokenizer.encode("ACGTTGCAAAGGTC")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert encoding.ids[0] == 1 and encoding.ids[-1] == 2
    assert "".join(encoding.tokens[1:-1]) == "ACGTTGCAAAGGTC"
    assert tokenizer.get_vocab_size() == 256


def test_embedder_upper_cases_and_counts_tokens(folder):
    embedder = DnabertSEmbedder(*load_dnabert_s(folder))
    seqs = ["acgtnacgtggccta", "ACGTNACGTGGCCTA"]
    out = embedder.embed(seqs)
    assert torch.equal(out[0], out[1])
    lengths = embedder.token_lengths(seqs)
    assert lengths.tolist() == [len(embedder.tokenizer.encode(seqs[1]).ids)] * 2


def test_model_matches_the_original_attention_path(folder, sequences):
    model, tokenizer = load_dnabert_s(folder)
    state = {k: v for k, v in model.state_dict().items()}
    for seq in sequences[:6]:
        ids = torch.tensor([tokenizer.encode(seq).ids])
        with torch.no_grad():
            ours = model(ids, torch.ones_like(ids))[0]
        assert (ours - reference_last_hidden(state, model.config, ids[0])).abs().max() <= 1e-5


def test_padding_positions_come_out_zero(folder):
    model, _ = load_dnabert_s(folder)
    ids = torch.tensor([[1, 7, 9, 2, 3, 3], [1, 8, 8, 8, 9, 2]])
    mask = (ids != 3).long()
    with torch.no_grad():
        hidden = model(ids, mask)  # [2, 6, 48]
    assert hidden.shape == (2, 6, 48)
    assert torch.count_nonzero(hidden[0, 4:]) == 0
    assert (hidden[0, :4] - model(ids[:1, :4], mask[:1, :4])[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("toks_per_batch", [1, 100, 1000, 131072])
def test_batched_equals_one_at_a_time(folder, sequences, one_at_a_time, toks_per_batch):
    out = DnabertSEmbedder(*load_dnabert_s(folder), toks_per_batch=toks_per_batch).embed(sequences)
    assert out.shape == (len(sequences), 48) and out.dtype == torch.float32
    assert (out - one_at_a_time).abs().max() <= 1e-5


def test_mean_includes_cls_and_sep(folder):
    model, tokenizer = load_dnabert_s(folder)
    seq = "ACGTACGGTTACCA"
    ids = torch.tensor([tokenizer.encode(seq).ids])
    with torch.no_grad():
        expected = model(ids, torch.ones_like(ids))[0].mean(0)
    out = DnabertSEmbedder(model, tokenizer).embed([seq])[0]
    assert (out - expected).abs().max() <= 1e-6


def test_bf16_on_cpu_is_close_to_fp32(folder, sequences, one_at_a_time):
    out = DnabertSEmbedder(*load_dnabert_s(folder), dtype=torch.bfloat16).embed(sequences)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert cosine(out, one_at_a_time).min() >= 0.9999  # DESIGN's bf16 gate holds on the tiny model too
    assert ((out - one_at_a_time).norm(dim=1) / one_at_a_time.norm(dim=1)).max() <= 1e-2
