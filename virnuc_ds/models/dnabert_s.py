"""DNABERT-S (DNABERT-2 / MosaicBERT architecture), written natively in torch.

The published model ships remote code that needs an old transformers and a Triton kernel; this
module is the same network with the same parameter names, so the real `pytorch_model.bin` or
`model.safetensors` loads with strict=True. Attention is torch SDPA with the ALiBi bias and the
key padding mask added as one float mask, so it runs fp32 on CPU and bf16 on GPU alike.

Shapes: B batch, T tokens, H hidden size, N heads, D = H / N head size, I intermediate size.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from virnuc_ds.errors import ConfigError, ModelNotFoundError, first_line

HF_REPO_ID = "zhihan1996/DNABERT-S"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # preferred first
CHECKPOINT_PREFIX = "bert."  # BertForMaskedLM-style checkpoints nest the encoder under it
IGNORED_CHECKPOINT_PREFIXES = ("cls.",)  # masked-LM head: not part of the encoder


@dataclass(frozen=True)
class DnabertSConfig:
    """The config.json keys the network needs (the file has more; they are ignored)."""

    vocab_size: int = 4096
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    alibi_starting_size: int = 512
    hidden_act: str = "gelu"

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DnabertSConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{path}: not a readable model config ({first_line(error)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a model config (a JSON object of settings is expected)")
        known = {f.name for f in fields(cls)}
        for key, value in raw.items():
            if key not in known or value is None:
                continue
            kind = type(getattr(cls, key))
            accepted = (int, float) if kind is float else kind
            if not isinstance(value, accepted) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
        config = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        if config.hidden_act != "gelu":
            raise ConfigError(f"{path}: hidden_act {config.hidden_act!r}; DNABERT-S uses 'gelu'")
        return config


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi head slopes as MosaicBERT computes them (12 heads: 2^-1..2^-8, 2^-0.5..2^-3.5)."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return geometric(num_heads)
    power_of_2 = 2 ** math.floor(math.log2(num_heads))
    return geometric(power_of_2) + alibi_slopes(2 * power_of_2)[0::2][: num_heads - power_of_2]


class DnabertSEmbeddings(nn.Module):
    """Token + token-type embeddings, LayerNorm; no position embeddings (ALiBi instead)."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T]; every token has token type 0
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # [B, T, H]
        return self.LayerNorm(x)


class DnabertSSelfAttention(nn.Module):
    """Fused q/k/v projection (with bias) and scaled dot-product attention."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.Wqkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H]; attn_bias: [B, N, T, T] additive, in x's dtype
        B, T, H = x.shape
        qkv = self.Wqkv(x).view(B, T, 3, self.num_heads, H // self.num_heads)  # [B, T, 3, N, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, N, T, D]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # [B, N, T, D]
        return context.transpose(1, 2).reshape(B, T, H)  # [B, T, H]


class DnabertSSelfOutput(nn.Module):
    """Output projection, residual, post-LayerNorm."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(context) + residual)  # [B, T, H]


class DnabertSAttention(nn.Module):
    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.self = DnabertSSelfAttention(config)
        self.output = DnabertSSelfOutput(config)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, attn_bias), x)  # [B, T, H]


class DnabertSGatedMLP(nn.Module):
    """GLU feed-forward: GELU(erf) of the first half times the second half, residual, post-LN."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gated_layers = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.wo = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H]
        gated, non_gated = self.gated_layers(x).split(self.intermediate_size, dim=-1)  # [B, T, I] x2
        return self.layernorm(self.wo(F.gelu(gated) * non_gated) + x)  # [B, T, H]


class DnabertSLayer(nn.Module):
    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.attention = DnabertSAttention(config)
        self.mlp = DnabertSGatedMLP(config)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attention(x, attn_bias))  # [B, T, H]


class DnabertSEncoder(nn.Module):
    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.layer = nn.ModuleList(DnabertSLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, attn_bias)
        return x  # [B, T, H]


class DnabertSPooler(nn.Module):
    """Kept so the checkpoint loads strictly; embeddings are mean-pooled, not pooled here."""

    def __init__(self, config: DnabertSConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class DnabertSModel(nn.Module):
    """DNABERT-S encoder: forward(input_ids, attention_mask) -> last hidden state [B, T, H]."""

    def __init__(self, config: DnabertSConfig, *, with_pooler: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = DnabertSEmbeddings(config)
        self.encoder = DnabertSEncoder(config)
        self.pooler = DnabertSPooler(config) if with_pooler else None
        slopes = torch.tensor(alibi_slopes(config.num_attention_heads), dtype=torch.float32)
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # [N]

    def attention_bias(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Symmetric ALiBi plus the key padding mask, one additive mask [B, N, T, T]."""
        T = attention_mask.shape[1]
        position = torch.arange(T, device=attention_mask.device)
        distance = (position[None, :] - position[:, None]).abs().float()  # [T, T]
        alibi = -self.alibi_slopes.float()[:, None, None] * distance  # [N, T, T]
        # finfo.min rather than -inf: a row never sees only padding ([CLS] is always a key).
        key_padding = torch.zeros(attention_mask.shape, dtype=torch.float32,
                                  device=attention_mask.device)
        key_padding.masked_fill_(~attention_mask.bool(), torch.finfo(dtype).min)  # [B, T]
        bias = alibi[None] + key_padding[:, None, None, :]  # [B, N, T, T] fp32
        return bias.clamp_min_(torch.finfo(dtype).min).to(dtype)  # no -inf on casting to fp16

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask: [B, T] (mask 1 = token, 0 = padding)
        x = self.embeddings(input_ids)  # [B, T, H]
        device = x.device.type
        bias_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                      else x.dtype)  # the dtype attention runs in
        x = self.encoder(x, self.attention_bias(attention_mask, bias_dtype))  # [B, T, H]
        # The original unpads and re-pads with zeros: padding positions come out as zeros.
        return x * attention_mask[..., None].to(x.dtype)  # [B, T, H]


def encoder_state_dict(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint keys as DnabertSModel names them: drop a `bert.` prefix and the masked-LM head."""
    state = {}
    for key, value in checkpoint.items():
        if key.startswith(IGNORED_CHECKPOINT_PREFIXES):
            continue
        state[key.removeprefix(CHECKPOINT_PREFIX)] = value
    return state


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def hf_cache_dirs() -> list[Path]:
    """Hugging Face hub caches, in the order huggingface_hub itself would use them."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]).expanduser())
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    dirs.append(Path("~/.cache/huggingface/hub").expanduser())
    return list(dict.fromkeys(dirs))


def is_model_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and (folder / TOKENIZER_FILE).is_file() and any(
        (folder / name).is_file() for name in WEIGHT_FILES)


def snapshot_folders(repo_cache: Path) -> list[Path]:
    """Snapshots of one cached repo: the one refs/main names first, then newest first."""
    snapshots = repo_cache / "snapshots"
    if not snapshots.is_dir():
        return []
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    main_ref = repo_cache / "refs" / "main"
    if main_ref.is_file():
        main = snapshots / main_ref.read_text().strip()
        found = [main] + [p for p in found if p != main]
    return found


def resolve_dnabert_s_folder(folder_or_repo: str | os.PathLike | None = None) -> Path:
    """The model folder: an explicit folder, a cached repo folder, or a repo id in the HF caches."""
    given = HF_REPO_ID if folder_or_repo is None else str(folder_or_repo)
    path = Path(given).expanduser()
    searched = [path] + snapshot_folders(path)  # a model folder, or a `models--org--name` cache
    if not path.is_dir() and given.count("/") == 1 and not given.startswith((".", "/", "~")):
        repo_cache_name = "models--" + given.replace("/", "--")  # a repo id: look in the caches
        for cache in hf_cache_dirs():
            searched += snapshot_folders(cache / repo_cache_name) or [cache / repo_cache_name]
    for candidate in searched:
        if is_model_folder(candidate):
            return candidate
    wanted = f"{CONFIG_FILE}, {TOKENIZER_FILE} and one of {', '.join(WEIGHT_FILES)}"
    raise ModelNotFoundError(f"DNABERT-S model {given!r} ({wanted})", searched)


def load_dnabert_s_tokenizer(folder: Path):
    """The BPE tokenizer from tokenizer.json, adding `[CLS] $A [SEP]`, never truncating or padding."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise ConfigError(f"{folder / TOKENIZER_FILE}: not a readable tokenizer ({first_line(error)})") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    if tokenizer.post_processor is None:
        cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return tokenizer


def load_dnabert_s(folder_or_repo: str | os.PathLike | None = None):
    """(model, tokenizer): weights loaded with strict=True, eval mode, fp32, CPU."""
    folder = resolve_dnabert_s_folder(folder_or_repo)
    config = DnabertSConfig.from_json_file(folder / CONFIG_FILE)
    weights_path = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
    try:
        weights = load_weights_file(weights_path)
    except Exception as error:  # noqa: BLE001 - truncated or not a weights file: one line naming it
        raise ConfigError(f"{weights_path}: not a readable weights file ({first_line(error)})") from None
    state = encoder_state_dict(weights)
    from .esm2 import skip_weight_init

    with skip_weight_init():  # every weight comes from the file (strict=True below)
        model = DnabertSModel(config, with_pooler=any(k.startswith("pooler.") for k in state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{weights_path}: weights do not match the DNABERT-S that {CONFIG_FILE} describes "
                          f"({first_line(error)})") from None
    model = model.float().eval().requires_grad_(False)
    return model, load_dnabert_s_tokenizer(folder)
