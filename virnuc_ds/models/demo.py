"""Tiny models written in the real on-disk formats, for tests and demos without a network.

`write_tiny_esm2` writes a fair-esm ESM-2 checkpoint (the layout of `esm2_t36_3B_UR50D.pt`);
`write_tiny_dnabert_s` writes a DNABERT-S model folder (config.json, weights, tokenizer.json).
Weights are random but deterministic for a seed; the real loaders read them unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from virnuc_ds.models.dnabert_s import DnabertSConfig, DnabertSModel

TINY_ESM2_FILE = "esm2_t2_demo.pt"
DNABERT_SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]  # ids 0..4


def _randomize(module: torch.nn.Module, generator: torch.Generator, scale: float) -> None:
    """Every parameter drawn afresh, LayerNorm weights near 1, so outputs depend on all of them."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("LayerNorm.weight") or name.endswith("layernorm.weight") or (
                    "layer_norm" in name and name.endswith("weight")):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(scale * noise)


def write_tiny_esm2(path: str | os.PathLike, seed: int = 0, *, num_layers: int = 2,
                    embed_dim: int = 32, attention_heads: int = 4,
                    contact_regression: bool = False, init_std: float | None = None) -> Path:
    """A tiny ESM-2 saved as a fair-esm checkpoint; `path` is a folder or a file named `esm2*.pt`.

    Layout as fair-esm's v2 loader reads it: {"model": state dict under `encoder.sentence_encoder.`
    (lm_head under `encoder.`), "cfg": {"model": argparse.Namespace(encoder_layers=...)}}. With
    `contact_regression`, also the `-contact-regression.pt` file fair-esm downloads beside it.
    Weights are N(0, init_std), default embed_dim^-0.5; LayerNorm weights 1 + N(0, 0.1).
    """
    from esm.model.esm2 import ESM2

    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / TINY_ESM2_FILE
    if not path.name.startswith("esm2"):
        raise ValueError(f"{path}: fair-esm recognises ESM-2 checkpoints by an 'esm2' file name")
    path.parent.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(seed)
    model = ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                 alphabet="ESM-1b", token_dropout=True)
    _randomize(model, generator, scale=init_std or embed_dim ** -0.5)

    state, regression = {}, {}
    for key, value in model.state_dict().items():
        if key.startswith("contact_head.regression."):
            regression[key] = value.clone()
        elif key.startswith("lm_head."):
            state["encoder." + key] = value.clone()
        else:
            state["encoder.sentence_encoder." + key] = value.clone()
    cfg_model = argparse.Namespace(
        _name="esm2", encoder_layers=num_layers, encoder_embed_dim=embed_dim,
        encoder_ffn_embed_dim=4 * embed_dim, encoder_attention_heads=attention_heads,
        token_dropout=True, dropout=0.0, attention_dropout=0.0, max_positions=1024)
    torch.save({"model": state, "cfg": {"model": cfg_model}}, path)
    if contact_regression:
        torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))
    return path


def tiny_dnabert_s_config(*, vocab_size: int = 256, hidden_size: int = 48,
                          num_hidden_layers: int = 2, num_attention_heads: int = 4,
                          intermediate_size: int = 96) -> dict:
    """config.json contents: the keys of the real DNABERT-S file, small sizes."""
    return {
        "_name_or_path": "zhihan1996/DNABERT-S",
        "alibi_starting_size": 512,
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_bert.BertConfig",
            "AutoModel": "bert_layers.BertModel",
            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
            "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
        },
        "classifier_dropout": None,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.28.0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def random_dna(rng: np.random.Generator, count: int, length: int) -> list[str]:
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    codes = bases[rng.integers(0, 4, size=(count, length))]  # [count, length] ASCII
    return [row.tobytes().decode() for row in codes]


def train_dna_bpe_tokenizer(vocab_size: int, seed: int):
    """A BPE tokenizer trained on random DNA, special ids [UNK]=0 .. [MASK]=4, `[CLS] $A [SEP]`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=DNABERT_SPECIAL_TOKENS,
                                  initial_alphabet=list("ACGTN"), show_progress=False)
    corpus = random_dna(np.random.default_rng(seed), count=200, length=500)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    return tokenizer


def write_tiny_dnabert_s(folder: str | os.PathLike, seed: int = 0, *,
                         weights_format: str = "safetensors", key_prefix: str = "",
                         init_std: float | None = None, **sizes) -> Path:
    """A tiny DNABERT-S model folder: config.json, model.safetensors (or pytorch_model.bin),
    tokenizer.json. `key_prefix="bert."` writes weights the way masked-LM checkpoints name them.

    Weights are N(0, init_std), default hidden_size^-0.5: large enough that every weight shows in
    the output. Full-size accuracy studies should pass the config's initializer_range (0.02): a
    12-layer post-LN network at the default scale is chaotic and amplifies bf16 rounding ~10x.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = tiny_dnabert_s_config(**sizes)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")

    tokenizer = train_dna_bpe_tokenizer(config_dict["vocab_size"], seed)
    tokenizer.save(str(folder / "tokenizer.json"))

    config = DnabertSConfig.from_json_file(folder / "config.json")
    model = DnabertSModel(config)
    _randomize(model, torch.Generator().manual_seed(seed),
               scale=init_std or config.hidden_size ** -0.5)
    state = {key_prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif weights_format == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        raise ValueError(f"weights_format {weights_format!r}: 'safetensors' or 'bin'")
    return folder
