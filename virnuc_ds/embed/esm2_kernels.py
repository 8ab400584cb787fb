"""ESM-2 on DeepSpeed's v1 inference kernels (`transformer_inference` op, DeepSpeed 0.19.x).

DeepSpeed ships no policy for fair-esm, and offers no hook to register one. Rather than patch its
policy list and container lookup, this module builds DeepSpeed's own `DeepSpeedTransformerInference`
layers from the weights of fair-esm's `TransformerLayer`s: a short policy class of accessors
(`ESM2LayerPolicy`, in the style of `deepspeed/module_inject/containers/`) says where each weight
lives, and `inject_layer` is the mechanism. Embedding, token-dropout scaling and the final layer norm
stay in torch; the 36 (or N) transformer layers run on DeepSpeed's kernels.

fair-esm's `TransformerLayer` is pre-LN, separate q/k/v projections with bias (fused here into one
[E, 3E] weight, q then k then v), rotary embeddings over the whole head (rotary_dim = D) with
`rotate_half`, no triangular mask, GELU MLP 4E wide. Mapped to DeepSpeed's config: pre_layer_norm,
rotate_half=True / rotate_every_two=False, triangular_masking=False, mlp_after_attn=True
(sequential, not GPT-J's parallel residual), scale_attention (1/sqrt(D) on the scores).

What the kernels do differently from the torch module, and how it is handled:
- Batch-first input [B, T, E]; fair-esm runs time-first internally. We feed batch-first.
- Padding mask: an additive mask [B, T] in the kernel dtype (0 keep, -10000 pad), which the softmax
  kernel reads per batch row. It is always passed: no host sync to ask whether there is padding.
- Each layer writes its output into its input tensor (the residual stream). The stream is a tensor
  this module allocates per call, so nothing the caller holds is overwritten.
- DeepSpeed's containers transpose the source weights in place. We copy instead: the caller's
  model is never modified (its weights may stay on the CPU; only the kernel copy goes to the GPU).
- The kernel GELU is the tanh approximation; fair-esm uses erf. The difference is measured in
  benchmarks/esm2_accuracy.py (configuration `fp32-tanh-gelu`) and is far inside the gates.
- Workspace: all activations, K/V and attention scores of one forward live in one buffer owned by a
  C++ singleton (one per process), allocated by its first sizing call and re-laid out per batch.
  DeepSpeed sizes it from the first forward it sees (a large first batch once took 108 GB); here it
  is sized deliberately from `max_tokens` and `max_len`, for the largest batch shape allowed, with
  a warm-up forward at that shape, and the GPU memory it took is logged. See `KernelWorkspace`.
- The softmax kernel indexes scores with 32-bit ints: a forward must keep B*H*T*T < 2^31. Calls
  whose batch exceeds that (or max_tokens) are split by rows, transparently.
- The rotary kernel supports head sizes D with D % 8 == 0 and 32 <= next_pow2(D) <= 256 in 16-bit
  (ESM-2 35M..15B; not the 8M model, D = 16): others raise KernelUnavailableError.
- DeepSpeed 0.19's JIT builder cannot parse TORCH_CUDA_ARCH_LIST entries such as `9.0a`: they are
  normalised (`9.0`) for this process before the op is built. `prebuild_inference_op()` builds or
  loads the op once under a file lock: call it from one process per node before the ranks start.
- DeepSpeed prints a "Free memory / Requested memory" banner to stdout whenever it reallocates the
  workspace; that is its own logging, not an error.

`attention="sdpa"` keeps DeepSpeed's layers (LN + GEMMs, MLP, residual) but replaces their
attention core (unfused softmax on sm80 GEMMs) by a Triton rotary kernel and torch's
scaled_dot_product_attention.
Measured on one H200 (benchmarks/NOTES.md): ESM-2 3B chunk500 81.9k -> 94.7k tokens/s, mixed
48.0k -> 78.1k, same accuracy (min pooled cosine 0.99997 against fp32).

Shapes: B batch, T tokens (BOS + residues + EOS, right-padded), E embed dim, H heads, D = E / H.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from deepspeed.module_inject.policy import TransformerPolicy
from deepspeed.utils.types import ActivationFuncType

from virnuc_ds.errors import VirnucError

log = logging.getLogger(__name__)

DEFAULT_MAX_LEN = 1026  # tokens: 1024 residues (the original's truncation) + BOS + EOS
MASK_RATIO_TRAIN = 0.15 * 0.8  # fair-esm's token-dropout constant
KERNEL_MASK_VALUE = -10000.0  # what DeepSpeed itself adds for a padded key
INT32_LIMIT = 2**31 - 1
GIB = 2**30


class KernelUnavailableError(VirnucError):
    """DeepSpeed's transformer_inference op cannot be built or loaded here, or cannot run this model."""


# ---------------------------------------------------------------------------------------------
# Building the op
# ---------------------------------------------------------------------------------------------

_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d+)[A-Za-z]*(\+PTX)?$")


def normalise_cuda_arch_list(environ=os.environ) -> str | None:
    """Rewrite TORCH_CUDA_ARCH_LIST so DeepSpeed 0.19 can parse it: `9.0a` -> `9.0`, `10.0f+PTX` ->
    `10.0+PTX` (the DeepSpeed kernels use no arch-specific features). Returns the value in force."""
    value = environ.get("TORCH_CUDA_ARCH_LIST")
    if not value or not value.strip():
        return value
    entries = [e for e in re.split(r"[;\s]+", value.strip()) if e]
    fixed = []
    for entry in entries:
        match = _ARCH_ENTRY.match(entry)
        if not match:
            raise KernelUnavailableError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 9.0, 9.0a or 9.0+PTX")
        fixed.append(f"{match[1]}.{match[2]}{match[3] or ''}")
    normalised = ";".join(dict.fromkeys(fixed))
    if normalised != value:
        log.info("TORCH_CUDA_ARCH_LIST %r normalised to %r for DeepSpeed's JIT builder",
                 value, normalised)
        environ["TORCH_CUDA_ARCH_LIST"] = normalised
    return normalised


def _extensions_dir() -> Path:
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415 (torch internal)

    try:  # where torch puts JIT builds: TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/pyXY_cuZ
        return Path(_get_build_directory("transformer_inference", verbose=False)).parent
    except Exception:  # noqa: BLE001 - fall back to the documented default
        return Path(os.environ.get("TORCH_EXTENSIONS_DIR",
                                   Path.home() / ".cache" / "torch_extensions"))


def prebuild_inference_op(verbose: bool = False):
    """Build (first time, about 45 s) or load DeepSpeed's transformer_inference op; returns it.

    Holds a file lock next to torch's extension builds, so the ranks of a node that all call this
    build it once between them; calling it from one process per node before the ranks start keeps
    them from waiting on each other. Raises KernelUnavailableError with the reason if it fails.
    """
    if not torch.cuda.is_available():
        raise KernelUnavailableError("DeepSpeed inference kernels need a CUDA GPU; none is visible")
    normalise_cuda_arch_list()
    from filelock import FileLock  # noqa: PLC0415 (torch depends on filelock)

    from deepspeed.ops.op_builder import InferenceBuilder  # noqa: PLC0415

    build_root = _extensions_dir()
    build_root.mkdir(parents=True, exist_ok=True)
    lock_path = build_root / "virnuc_ds.transformer_inference.lock"
    started = time.perf_counter()
    try:
        with FileLock(str(lock_path)):
            module = InferenceBuilder().load(verbose=verbose)
    except Exception as error:  # the builder raises RuntimeError, ImportError, CalledProcessError...
        raise KernelUnavailableError(
            f"DeepSpeed transformer_inference op could not be built or loaded "
            f"({type(error).__name__}: {error}); build log under {build_root}") from error
    log.info("DeepSpeed transformer_inference op ready in %.1f s", time.perf_counter() - started)
    return module


# ---------------------------------------------------------------------------------------------
# Policy: where fair-esm keeps each weight
# ---------------------------------------------------------------------------------------------


class ESM2LayerPolicy(TransformerPolicy):
    """Accessors for one fair-esm `esm.modules.TransformerLayer`, in DeepSpeed's policy terms.

    Weights are returned in nn.Linear layout ([out, in]), as DeepSpeed's policies return them.
    """

    def __init__(self, client_module):
        super().__init__(inference=True, linear_layer=True, scale_attention=True,
                         mlp_act_func_type=ActivationFuncType.GELU, pre_attn_norm=True)
        self.client_module = client_module

    def get_hidden_heads(self):
        """(E, H, layer-norm eps, FFN width)."""
        layer = self.client_module
        return (layer.embed_dim, layer.attention_heads, layer.self_attn_layer_norm.eps,
                layer.ffn_embed_dim)

    def attention(self):
        """qkv weight [3E, E] and bias [3E] (q, k, v blocks, heads inside each), out proj."""
        attn = self.client_module.self_attn
        qkvw = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
        qkvb = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dim=0)
        return qkvw, qkvb, attn.out_proj.weight, attn.out_proj.bias

    def mlp(self):
        """fc1 [4E, E] + bias, fc2 [E, 4E] + bias."""
        layer = self.client_module
        return layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias

    def layernorm(self):
        """(norm before the MLP, norm before attention), weight and bias each."""
        layer = self.client_module
        return (layer.final_layer_norm.weight, layer.final_layer_norm.bias,
                layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias)


def check_layer_supported(layer) -> None:
    """Raise KernelUnavailableError if DeepSpeed's kernels cannot run this fair-esm layer."""
    attn = layer.self_attn
    problems = []
    if getattr(attn, "rot_emb", None) is None:
        problems.append("no rotary embeddings (ESM-1 style layer)")
    if getattr(attn, "bias_k", None) is not None or getattr(attn, "add_zero_attn", False):
        problems.append("bias_kv / zero attention")
    if attn.q_proj.bias is None:
        problems.append("projections without bias")
    if layer.self_attn_layer_norm.eps != layer.final_layer_norm.eps:
        problems.append("different epsilons in the two layer norms (the kernels take one)")
    head_dim = layer.embed_dim // layer.attention_heads
    if not rotary_head_size_supported(head_dim, elem_size=2):
        problems.append(f"head size {head_dim} (the rotary kernel needs D % 8 == 0 and "
                        f"32 <= next_pow2(D) <= 256)")
    if problems:
        raise KernelUnavailableError("DeepSpeed inference kernels cannot run this ESM-2 layer: "
                                     + "; ".join(problems))


def rotary_head_size_supported(head_dim: int, elem_size: int) -> bool:
    """Mirror of launch_apply_rotary_pos_emb's launch checks (apply_rotary_pos_emb.cu)."""
    half = head_dim // 2
    for alignment in (16, 8, 4):
        if half % (alignment // elem_size) == 0:
            break
    else:
        return False
    per_thread = alignment // elem_size
    padded = 1 << (head_dim - 1).bit_length()
    return head_dim % 8 == 0 and padded <= 32 * per_thread and padded // per_thread in (4, 8, 16, 32)


# ---------------------------------------------------------------------------------------------
# Mechanism: a DeepSpeedTransformerInference layer filled from a policy
# ---------------------------------------------------------------------------------------------


def inference_config(policy: ESM2LayerPolicy, dtype: torch.dtype):
    from deepspeed.ops.transformer.inference.config import DeepSpeedInferenceConfig  # noqa: PLC0415

    hidden, heads, eps, ffn = policy.get_hidden_heads()
    return DeepSpeedInferenceConfig(
        hidden_size=hidden, intermediate_size=ffn, heads=heads, layer_norm_eps=eps, dtype=dtype,
        pre_layer_norm=True, mlp_after_attn=True, mlp_act_func_type=policy.mlp_act_func_type,
        rotary_dim=hidden // heads, rotate_half=True, rotate_every_two=False, rope_theta=10000,
        triangular_masking=False, scale_attention=True, return_tuple=False,
        transposed_mode=False)


def inject_layer(policy: ESM2LayerPolicy, dtype: torch.dtype, attention: str = "deepspeed"):
    """A DeepSpeedTransformerInference on the current CUDA device holding copies of the layer's
    weights (transposed to [in, out] as the kernels want them). The source layer is not touched.
    attention="sdpa" swaps the layer's attention core for sdpa_compute_attention."""
    from deepspeed.model_implementations.transformers.ds_transformer import (  # noqa: PLC0415
        DeepSpeedTransformerInference)

    module = DeepSpeedTransformerInference(inference_config(policy, dtype)).eval()
    # Encoder only, no generation cache: every layer uses the workspace's one K/V slot (layer 0),
    # and the workspace is laid out by KernelWorkspace, never by a layer's first forward.
    module.config.layer_id = 0
    module._should_allocate_workspace = False

    qkvw, qkvb, dense_w, dense_b = policy.attention()
    h4h_w, h4h_b, _4hh_w, _4hh_b = policy.mlp()
    attn_nw, attn_nb, input_nw, input_nb = policy.layernorm()
    targets = [
        (module.attention.attn_qkvw, qkvw.t()), (module.attention.attn_qkvb, qkvb),
        (module.attention.attn_ow, dense_w.t()), (module.attention.attn_ob, dense_b),
        (module.mlp.inter_w, h4h_w.t()), (module.mlp.inter_b, h4h_b),
        (module.mlp.output_w, _4hh_w.t()), (module.mlp.output_b, _4hh_b),
        (module.mlp.attn_nw, attn_nw), (module.mlp.attn_nb, attn_nb),
        (module.norm_w, input_nw), (module.norm_b, input_nb),
    ]
    with torch.no_grad():
        for param, source in targets:
            if param.shape != source.shape:
                raise KernelUnavailableError(f"ESM-2 weight of shape {tuple(source.shape)} does not "
                                             f"fit the kernel parameter {tuple(param.shape)}")
            param.copy_(source)  # device and dtype conversion; strided read of the transpose
    if attention == "sdpa":
        module.attention.compute_attention = types.MethodType(sdpa_compute_attention,
                                                              module.attention)
    elif attention != "deepspeed":
        raise ValueError(f"attention must be 'deepspeed' or 'sdpa', not {attention!r}")
    return module


# ---------------------------------------------------------------------------------------------
# Optional attention: fused rotary (Triton) + torch SDPA instead of DeepSpeed's unfused attention
# ---------------------------------------------------------------------------------------------

_ROTARY_KERNEL = None


def _rotary_kernel():
    """A Triton kernel rotating q and k in place inside the qkv projection output [B*T, 3, H, D],
    as fair-esm does (rotate_half, positions 0..T-1, theta 10000), in fp32."""
    global _ROTARY_KERNEL
    if _ROTARY_KERNEL is None:
        import triton  # noqa: PLC0415
        import triton.language as tl  # noqa: PLC0415

        @triton.jit
        def rotary_qk_(qkv, seq_len, H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr,
                       LOG2_THETA: tl.constexpr):
            row = tl.program_id(0)  # b * T + t
            heads = tl.program_id(1) * HB + tl.arange(0, HB)  # [HB]
            j = tl.arange(0, D // 2)  # [D/2]
            inv_freq = tl.exp2(-(2.0 * j.to(tl.float32) / D) * LOG2_THETA)  # theta^(-2j/D)
            angle = (row % seq_len).to(tl.float32) * inv_freq
            cos, sin = tl.cos(angle)[None, :], tl.sin(angle)[None, :]
            keep = (heads < H)[:, None]
            for which in tl.static_range(2):  # q, then k
                first = qkv + row.to(tl.int64) * 3 * H * D + which * H * D \
                    + heads[:, None] * D + j[None, :]  # [HB, D/2]
                x1 = tl.load(first, mask=keep).to(tl.float32)
                x2 = tl.load(first + D // 2, mask=keep).to(tl.float32)
                tl.store(first, (x1 * cos - x2 * sin).to(qkv.dtype.element_ty), mask=keep)
                tl.store(first + D // 2, (x2 * cos + x1 * sin).to(qkv.dtype.element_ty), mask=keep)

        _ROTARY_KERNEL = rotary_qk_
    return _ROTARY_KERNEL


def sdpa_compute_attention(self, qkv_out, input_mask, layer_past, alibi, is_prompt, token_idx,
                           position_ids):
    """Replaces DeepSpeedSelfAttention.compute_attention: rotary in place, then torch's
    scaled_dot_product_attention (scale 1/sqrt(D)) with the additive key mask [B, T]."""
    qkv = qkv_out[0] if isinstance(qkv_out, (list, tuple)) else qkv_out  # [B, T, 3E]
    B, T, three_e = qkv.shape
    H = self.num_attention_heads_per_partition
    D = three_e // (3 * H)
    heads_per_block = 8
    _rotary_kernel()[(B * T, triton_cdiv(H, heads_per_block))](
        qkv, T, H=H, D=D, HB=heads_per_block, LOG2_THETA=math.log2(self.config.rope_theta))
    q, k, v = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, D]
    mask = None if input_mask is None else input_mask[:, None, None, :]  # [B, 1, 1, T]
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, D]
    return context.transpose(1, 2).reshape(B, T, H * D).contiguous(), k, v


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Workspace
# ---------------------------------------------------------------------------------------------


def max_rows_per_call(max_tokens: int, heads: int, length: int) -> int:
    """Rows of `length` tokens one kernel forward may take: B*T <= max_tokens and B*H*T*T < 2^31
    (the softmax kernel's 32-bit indexing); at least 1 (one long sequence always runs alone)."""
    return max(1, min(max_tokens // length, INT32_LIMIT // (heads * length * length)))


def workspace_elements(rows: int, length: int, hidden: int, heads: int) -> int:
    """Elements InferenceContext::GenWorkSpace allocates for a (rows, length) layout with one K/V
    layer slot and no tensor parallelism (inference_context.h, DeepSpeed 0.19)."""
    head = hidden // heads
    padded = 32 if head <= 32 else (64 if head <= 64 else 128)
    effective = head if head > 128 else padded
    activations = 10 * heads * effective * rows
    scores = rows * heads * length
    kv_cache = rows * heads * effective * 2
    return (activations + scores + kv_cache) * length


class KernelWorkspace:
    """DeepSpeed's one kernel workspace per process, sized once and re-laid out per batch.

    GenWorkSpace(rows, T) lays the buffer out for that batch shape (K/V strides depend on T and
    rows); it reallocates only when asked for more than the previous call asked for. `reserve()`
    asks once for the largest layout any allowed batch needs, so the allocation happens there, at
    a known size, and is logged. A later batch asking for more than the batch before it (but never
    more than the reservation) makes DeepSpeed free and re-malloc the buffer, a device sync:
    feed batches longest-first (as virnuc_ds.embed.esm2.plan_token_batches does) to avoid it.
    """

    def __init__(self, config, *, max_tokens: int, max_len: int, elem_size: int):
        from deepspeed.ops.transformer.inference.op_binding.workspace import WorkspaceOp  # noqa

        self.hidden, self.heads = config.hidden_size, config.heads
        self.max_tokens, self.max_len, self.elem_size = max_tokens, max_len, elem_size
        self._op = WorkspaceOp(config)
        sizes = {}
        for length in range(2, max_len + 1):
            rows = max_rows_per_call(max_tokens, self.heads, length)
            sizes[(rows, length)] = workspace_elements(rows, length, self.hidden, self.heads)
        self.reserve_shape = max(sizes, key=sizes.get)  # (rows, T) of the largest layout
        self.reserved_bytes = sizes[self.reserve_shape] * elem_size

    # DeepSpeed's InferenceContext is one per process: so is what it last laid out
    _last_request = 0
    reallocations = 0  # requests larger than the one before: DeepSpeed freed and re-malloced

    def _layout(self, rows: int, length: int) -> None:
        request = workspace_elements(rows, length, self.hidden, self.heads) * self.elem_size
        if request > self.reserved_bytes:
            raise ValueError(f"batch of {rows} x {length} tokens is larger than the workspace was "
                             f"sized for (max_tokens={self.max_tokens}, max_len={self.max_len})")
        if KernelWorkspace._last_request and request > KernelWorkspace._last_request:
            KernelWorkspace.reallocations += 1
        # hidden, heads, prompt_length, batch_size, num_layers (K/V slots), mp_size,
        # external_cache, rank, max_out_tokens (the K/V stride), min_out_tokens (C++ throws if
        # the buffer would hold fewer than this, instead of silently laying out a shorter one)
        self._op.allocate_workspace(self.hidden, self.heads, length, rows, 1, 1, False, 0,
                                    length, length)
        KernelWorkspace._last_request = request

    def reserve(self) -> int:
        """Allocate for the largest layout now; returns the GPU bytes it took."""
        free_before = torch.cuda.mem_get_info()[0]
        needed = self.reserved_bytes + self.reserve_shape[0] * self.heads * self.max_len + 2 * GIB
        if needed > free_before:
            raise KernelUnavailableError(
                f"kernel workspace needs {self.reserved_bytes / GIB:.1f} GiB for max_tokens="
                f"{self.max_tokens}, max_len={self.max_len}; {free_before / GIB:.1f} GiB free: "
                f"lower the token budget")
        try:
            self._layout(*self.reserve_shape)
        except RuntimeError as error:  # GenWorkSpace: "Workspace can't be allocated..."
            raise KernelUnavailableError(f"kernel workspace of {self.reserved_bytes / GIB:.1f} GiB "
                                         f"could not be laid out: {error}") from error
        torch.cuda.synchronize()
        return free_before - torch.cuda.mem_get_info()[0]

    def layout(self, rows: int, length: int) -> None:
        self._layout(rows, length)


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------


class ESM2KernelEncoder:
    """tokens [B, T] int64 (on the device) -> final-layer representations [B, T, E] float32,
    after emb_layer_norm_after, as fair-esm's forward computes them (pad positions: anything)."""

    def __init__(self, model, alphabet, *, dtype: torch.dtype, device: torch.device,
                 max_tokens: int, max_len: int, attention: str = "deepspeed"):
        self.device, self.dtype, self.attention = device, dtype, attention
        self.max_tokens, self.max_len = max_tokens, max_len
        self.padding_idx, self.mask_idx = alphabet.padding_idx, alphabet.mask_idx
        self.token_dropout = bool(getattr(model, "token_dropout", True))
        self.embed_scale = float(getattr(model, "embed_scale", 1.0))
        self.heads = model.attention_heads
        with torch.no_grad():
            self.embed_weight = model.embed_tokens.weight.detach().to(device, torch.float32)
            final_ln = model.emb_layer_norm_after
            self.final_ln = (final_ln.weight.detach().to(device, torch.float32),
                             final_ln.bias.detach().to(device, torch.float32), final_ln.eps)
        for layer in model.layers:
            check_layer_supported(layer)
        with torch.cuda.device(device):
            self.layers = [inject_layer(ESM2LayerPolicy(layer), dtype, attention)
                           for layer in model.layers]
            self.workspace = KernelWorkspace(self.layers[0].config, max_tokens=max_tokens,
                                             max_len=max_len, elem_size=torch.finfo(dtype).bits // 8)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """fair-esm's embedding, token-dropout rescaling and pad zeroing, in fp32 -> [B, T, E]."""
        padding = tokens.eq(self.padding_idx)  # [B, T]
        x = self.embed_scale * F.embedding(tokens, self.embed_weight)  # [B, T, E]
        if self.token_dropout:
            masked = tokens.eq(self.mask_idx)  # [B, T]
            x = x.masked_fill(masked[..., None], 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)  # [B]
            x = x * (1 - MASK_RATIO_TRAIN) / (1 - observed)[:, None, None]
        return x * (1 - padding[..., None].to(x.dtype))

    def _forward_rows(self, tokens: torch.Tensor, layers: list | None = None) -> torch.Tensor:
        rows, length = tokens.shape
        self.workspace.layout(rows, length)
        x = self.embed(tokens).to(self.dtype).contiguous()  # [B, T, E], the residual stream
        key_mask = tokens.eq(self.padding_idx).to(self.dtype) * KERNEL_MASK_VALUE  # [B, T]
        for layer in self.layers if layers is None else layers:
            x = layer(x, input_mask=key_mask)  # writes into x and returns it
        weight, bias, eps = self.final_ln
        return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)  # [B, T, E] fp32

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.dtype != torch.int64:
            raise ValueError(f"tokens must be [B, T] int64, got {tuple(tokens.shape)} {tokens.dtype}")
        rows, length = tokens.shape
        if not 2 <= length <= self.max_len:
            raise ValueError(f"batch length {length} tokens outside 2..{self.max_len} "
                             f"(max_len this encoder was sized for)")
        tokens = tokens.to(self.device, non_blocking=True)
        step = max_rows_per_call(self.max_tokens, self.heads, length)
        with torch.cuda.device(self.device):
            if rows <= step:
                return self._forward_rows(tokens)
            return torch.cat([self._forward_rows(tokens[i:i + step])
                              for i in range(0, rows, step)])

    def warm_up(self) -> dict:
        """A forward at the largest layout through the first layer and the final layer norm: the
        workspace, cuBLAS and torch's caches reach their steady size here and not in the middle of a
        run. One layer is enough: every layer has the same shapes and writes into the same residual
        stream, so the others reuse what the first one allocated (the whole stack adds an estimated
        ~0.7 s of ESM-2 3B compute to every rank's start: ~400 TFLOP at the largest layout). Returns what it took."""
        rows, length = self.workspace.reserve_shape
        stats = torch.cuda.memory_stats(self.device)
        allocated_before = stats.get("allocated_bytes.all.current", 0)
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = torch.randint(4, 24, (rows, length), device=self.device)  # residues, no padding
        started = time.perf_counter()
        with torch.inference_mode(), torch.cuda.device(self.device):
            self._forward_rows(tokens, self.layers[:1])
        torch.cuda.synchronize(self.device)
        return {"warmup_shape": [rows, length], "warmup_s": time.perf_counter() - started,
                "torch_peak_bytes": torch.cuda.max_memory_allocated(self.device) - allocated_before}


def build_kernel_encoder(model, alphabet, *, dtype: torch.dtype = torch.bfloat16,
                         device="cuda", max_tokens: int = 65536,
                         max_len: int = DEFAULT_MAX_LEN, warm_up: bool = True,
                         attention: str = "deepspeed") -> ESM2KernelEncoder:
    """ESM-2 (fair-esm `esm.model.esm2.ESM2`, any size) on DeepSpeed's inference kernels.

    Returns a callable: tokens [B, T] int64 -> final-layer representations [B, T, E] float32
    (pad positions undefined). `max_tokens` is the padded token budget of one forward (bigger
    batches are split by rows), `max_len` the longest batch length T in tokens. The caller's model
    is not modified and may live on the CPU. The op is built if needed (prebuild_inference_op).
    attention: "deepspeed" (the v1 kernels' own attention, the default) or "sdpa" (rotary by a
    Triton kernel and torch's scaled_dot_product_attention, inside the same DeepSpeed layers).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"kernel dtype must be bfloat16 or float16, not {dtype}")
    if max_tokens < 2 or max_len < 2:
        raise ValueError("max_tokens and max_len must be at least 2")
    device = torch.device(device)
    if device.type != "cuda":
        raise KernelUnavailableError(f"DeepSpeed inference kernels need a CUDA device, not {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    prebuild_inference_op()
    allocated_before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    encoder = ESM2KernelEncoder(model.eval(), alphabet, dtype=dtype, device=device,
                                max_tokens=max_tokens, max_len=max_len, attention=attention)
    weights_bytes = torch.cuda.memory_allocated(device) - allocated_before
    with torch.cuda.device(device):
        workspace_bytes = encoder.workspace.reserve()
    encoder.memory = {"weights_bytes": weights_bytes, "workspace_bytes": workspace_bytes,
                      "workspace_shape": list(encoder.workspace.reserve_shape)}
    if warm_up:
        encoder.memory.update(encoder.warm_up())
    log.info("ESM-2 on DeepSpeed kernels (%s, %d layers, E=%d): weights %.2f GiB, workspace "
             "%.2f GiB for max_tokens=%d max_len=%d (layout %s), warm-up peak %.2f GiB more, "
             "built in %.1f s", str(dtype).removeprefix("torch."), len(encoder.layers),
             model.embed_dim, weights_bytes / GIB, workspace_bytes / GIB, max_tokens, max_len,
             encoder.workspace.reserve_shape,
             encoder.memory.get("torch_peak_bytes", 0) / GIB, time.perf_counter() - started)
    return encoder


__all__ = ["KernelUnavailableError", "ESM2LayerPolicy", "ESM2KernelEncoder", "KernelWorkspace",
           "build_kernel_encoder", "prebuild_inference_op", "normalise_cuda_arch_list",
           "max_rows_per_call"]
