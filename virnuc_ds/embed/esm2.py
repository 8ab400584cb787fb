"""ESM-2 pooled protein embeddings, computed as the original tool computes them.

Per protein: the last layer's representation (after the final layer norm), averaged over the
residue positions 1..len (no BOS/EOS, no padding), proteins cut to `max_residues` first. The
model is an encoder callable `tokens [B, T] -> representations [B, T, E]`: fair-esm's own forward
(eager) or DeepSpeed's injected kernels (`kernel_inject=True`); batching and pooling are shared.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from esm.rotary_embedding import RotaryEmbedding, apply_rotary_pos_emb

log = logging.getLogger(__name__)

MAX_RESIDUES = 1024  # the original's truncation_seq_length: mean over positions 1..min(len, 1024)

Encoder = Callable[[torch.Tensor], torch.Tensor]  # tokens [B, T] int64 -> reps [B, T, E]


def esm2_token_count(protein: str, max_residues: int = MAX_RESIDUES) -> int:
    """Tokens the model sees for one protein: its residues (cut to max_residues), BOS and EOS."""
    return min(len(protein), max_residues) + 2


def plan_token_batches(token_counts: Sequence[int], toks_per_batch: int) -> list[np.ndarray]:
    """Micro-batches of indices, longest first: padded size B * T_max <= toks_per_batch, or one
    sequence alone when it is longer than the budget."""
    counts = np.asarray(token_counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")  # longest first: a batch's first is its T_max
    batches, start = [], 0
    while start < len(order):
        size = max(1, toks_per_batch // int(counts[order[start]]))
        batches.append(order[start:start + size])
        start += size
    return batches


class RotaryEmbeddingFp32Tables(RotaryEmbedding):
    """fair-esm's rotary embedding with its frequency and cos/sin tables kept in fp32.

    Casting the model to bf16 would cast fair-esm's `inv_freq` too, and its positions with it
    (bf16 holds integers exactly only up to 256). The tables are made in fp32 and cast to the
    activation dtype where applied; in fp32 this is exactly fair-esm's computation.
    """

    def forward(self, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self._update_cos_sin_tables(k, seq_dimension=-2)  # [1, T, D] fp32
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)


def keep_rotary_tables_fp32(model: torch.nn.Module) -> None:
    for layer in model.layers:
        attention = layer.self_attn
        if attention.rot_emb is not None:
            device = attention.rot_emb.inv_freq.device
            attention.rot_emb = RotaryEmbeddingFp32Tables(dim=attention.head_dim).to(device)


def deepspeed_inference_engine(model: torch.nn.Module, dtype: torch.dtype):
    """The model wrapped by DeepSpeed's InferenceEngine without kernel injection.

    Its forward is the module's own, so results are unchanged. `keep_module_on_host` stops
    DeepSpeed moving the model to its idea of the current device: it is already where we put it.
    DeepSpeed works on CPU (its CPU accelerator); if it cannot start, the plain model is used.
    """
    try:
        import deepspeed

        return deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False,
                                        keep_module_on_host=True)
    except Exception as error:  # an optional wrapper: report it, run the same forward without it
        log.warning("DeepSpeed init_inference failed (%s); running the plain torch model", error)
        return model


def eager_encoder(model: torch.nn.Module, *, dtype: torch.dtype, device: torch.device,
                  use_deepspeed: bool = True) -> Encoder:
    """fair-esm's own forward as an encoder: tokens [B, T] -> last-layer reps [B, T, E] (after the
    final layer norm; token dropout scaling applied as fair-esm does in eval)."""
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    runner = deepspeed_inference_engine(model, dtype) if use_deepspeed else model
    keep_rotary_tables_fp32(model)  # after DeepSpeed's own dtype cast of the module
    last_layer = model.num_layers

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        return runner(tokens, repr_layers=[last_layer])["representations"][last_layer]

    encode.runner = runner  # what runs the forward: DeepSpeed's InferenceEngine or the plain model
    return encode


def mean_over_residues(reps: torch.Tensor, residue_counts: torch.Tensor) -> torch.Tensor:
    """Mean of reps [B, T, E] over positions 1..count (no BOS/EOS/padding) -> [B, E] fp32."""
    positions = torch.arange(reps.shape[1], device=reps.device)  # [T]
    counts = residue_counts.to(reps.device)  # [B]
    in_protein = (positions >= 1) & (positions <= counts[:, None])  # [B, T]
    # masked_fill, not a product: padding rows of an injected kernel may hold anything, even NaN
    kept = reps.masked_fill(~in_protein[..., None], 0.0)  # [B, T, E]
    summed = kept.sum(dim=1, dtype=torch.float32)  # [B, E], accumulated in fp32
    return summed / counts[:, None].float()


class Esm2Embedder:
    """Mean-pooled last-layer ESM-2 embeddings of proteins, batched by a token budget.

    Eager (`kernel_inject=False`): the model itself is cast to `dtype`, moved to `device` and,
    with `use_deepspeed`, wrapped by DeepSpeed's InferenceEngine. Injected: the model is handed to
    `esm2_kernels.build_kernel_encoder`. Either way `embed` batches, runs the encoder and pools.
    """

    def __init__(self, model, alphabet, *, device="cpu", dtype=torch.float32,
                 kernel_inject: bool = False, toks_per_batch: int = 65536,
                 max_residues: int = MAX_RESIDUES, use_deepspeed: bool = True,
                 attention: str = "deepspeed"):
        if toks_per_batch < 1 or max_residues < 1:
            raise ValueError("toks_per_batch and max_residues must be positive")
        self.alphabet = alphabet
        self.device = torch.device(device)
        self.dtype = dtype
        self.toks_per_batch = toks_per_batch
        self.max_residues = max_residues
        self.embed_dim = model.embed_dim
        self.truncated_count = 0  # proteins cut to max_residues so far
        if kernel_inject:
            from virnuc_ds.embed.esm2_kernels import build_kernel_encoder

            self.encoder = build_kernel_encoder(model, alphabet, dtype=dtype, device=self.device,
                                                max_tokens=toks_per_batch,
                                                max_len=max_residues + 2,
                                                attention=attention)
        else:
            self.encoder = eager_encoder(model, dtype=dtype, device=self.device,
                                         use_deepspeed=use_deepspeed)
        self._residue_ids = self._single_letter_lookup(alphabet)

    @staticmethod
    def _single_letter_lookup(alphabet) -> np.ndarray:
        """byte -> token id for one-letter tokens, -1 elsewhere (those go through alphabet.encode)."""
        lookup = np.full(256, -1, dtype=np.int64)
        for token, index in alphabet.tok_to_idx.items():
            if len(token) == 1 and token.isascii():
                lookup[ord(token)] = index
        return lookup

    def token_count(self, protein: str) -> int:
        return esm2_token_count(protein, self.max_residues)

    def token_lengths(self, proteins: Sequence[str]) -> np.ndarray:
        """Tokens per protein (residues cut to max_residues, plus BOS and EOS), for load balancing."""
        return np.array([self.token_count(p) for p in proteins], dtype=np.int64)

    def residue_ids(self, protein: str) -> np.ndarray:
        """Token ids of a protein's residues, as alphabet.encode gives them, cut to max_residues."""
        raw = np.frombuffer(protein.encode("ascii", errors="replace"), dtype=np.uint8)
        ids = self._residue_ids[raw]
        if (ids < 0).any() or "<" in protein:  # rare: multi-letter tokens or unknown letters
            try:
                ids = np.asarray(self.alphabet.encode(protein), dtype=np.int64)
            except KeyError as error:
                raise ValueError(f"protein {protein[:30]!r}...: {error} is not an ESM-2 token") from None
        return ids[: self.max_residues]

    def batch_tokens(self, proteins: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T] int64 with BOS/EOS/padding as fair-esm's BatchConverter makes them,
        residue counts [B])."""
        residues = [self.residue_ids(p) for p in proteins]
        counts = np.array([len(r) for r in residues], dtype=np.int64)
        tokens = np.full((len(residues), int(counts.max()) + 2), self.alphabet.padding_idx,
                         dtype=np.int64)  # [B, T]
        tokens[:, 0] = self.alphabet.cls_idx
        for row, ids in enumerate(residues):
            tokens[row, 1:len(ids) + 1] = ids
            tokens[row, len(ids) + 1] = self.alphabet.eos_idx
        return torch.from_numpy(tokens), torch.from_numpy(counts)

    @torch.inference_mode()
    def embed(self, proteins: Sequence[str]) -> torch.Tensor:
        """Embeddings [N, E] float32 on CPU, in input order."""
        if any(len(p) == 0 for p in proteins):
            raise ValueError("empty protein sequence: it has no residues to average")
        out = torch.empty((len(proteins), self.embed_dim), dtype=torch.float32)
        self.truncated_count += sum(len(p) > self.max_residues for p in proteins)
        for batch in plan_token_batches(self.token_lengths(proteins), self.toks_per_batch):
            tokens, counts = self.batch_tokens([proteins[i] for i in batch])
            reps = self.encoder(tokens.to(self.device, non_blocking=True))  # [B, T, E]
            out[torch.from_numpy(batch)] = mean_over_residues(reps, counts).cpu()
        return out
