"""DNABERT-S pooled nucleotide embeddings, computed as the original tool computes them.

Per sequence: the mean of the last hidden state over all its tokens, [CLS] and [SEP] included.
The original ran each sequence alone; here sequences run in padded batches and the mean is
mask-aware (padding excluded, accumulated in fp32), so a batch gives what one-at-a-time gives.

Lower precision is mixed precision: weights, LayerNorms and the residual stream stay fp32 and
torch.autocast runs the matrix products and attention in bf16. Measured on an H200 with the real
architecture and random weights (std 0.02), pooled output against fp32: relative L2 3.4e-3 for
autocast against 1.15e-2 for a model cast wholly to bf16 (over the 1e-2 gate), at 10% more time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from virnuc_ds.embed.esm2 import plan_token_batches

PAD_TOKEN = "[PAD]"


def mean_over_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, T, H] over the tokens attention_mask [B, T] keeps -> [B, H] fp32."""
    keep = attention_mask.bool()[..., None]  # [B, T, 1]
    summed = hidden.masked_fill(~keep, 0.0).sum(dim=1, dtype=torch.float32)  # [B, H]
    return summed / keep.sum(dim=1).float()


class DnabertSEmbedder:
    """Mean-pooled DNABERT-S embeddings of nucleotide sequences, batched by a token budget."""

    def __init__(self, model, tokenizer, *, device="cpu", dtype=torch.float32,
                 toks_per_batch: int = 131072):
        if toks_per_batch < 1:
            raise ValueError("toks_per_batch must be positive")
        self.device = torch.device(device)
        self.dtype = dtype  # the autocast dtype of matrix products and attention
        self.toks_per_batch = toks_per_batch
        self.model = model.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.hidden_size = model.config.hidden_size
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        self.pad_id = 3 if pad_id is None else pad_id

    def token_ids(self, nucleotides: Sequence[str]) -> list[list[int]]:
        """Token ids of each sequence, upper-cased first, with [CLS] ... [SEP] around them."""
        encodings = self.tokenizer.encode_batch([s.upper() for s in nucleotides],
                                                add_special_tokens=True)
        return [e.ids for e in encodings]

    def token_lengths(self, nucleotides: Sequence[str]) -> np.ndarray:
        """Tokens per sequence, [CLS] and [SEP] included, for load balancing."""
        return np.array([len(ids) for ids in self.token_ids(nucleotides)], dtype=np.int64)

    def batch_tensors(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, T] padded with [PAD], attention_mask [B, T])."""
        lengths = [len(x) for x in ids]
        input_ids = np.full((len(ids), max(lengths)), self.pad_id, dtype=np.int64)  # [B, T]
        attention_mask = np.zeros(input_ids.shape, dtype=np.int64)  # [B, T]
        for row, (x, n) in enumerate(zip(ids, lengths)):
            input_ids[row, :n] = x
            attention_mask[row, :n] = 1
        return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    @torch.inference_mode()
    def embed(self, nucleotides: Sequence[str]) -> torch.Tensor:
        """Embeddings [N, H] float32 on CPU, in input order."""
        ids = self.token_ids(nucleotides)
        out = torch.empty((len(ids), self.hidden_size), dtype=torch.float32)
        lengths = [len(x) for x in ids]
        for batch in plan_token_batches(lengths, self.toks_per_batch):
            input_ids, attention_mask = self.batch_tensors([ids[i] for i in batch])
            input_ids = input_ids.to(self.device, non_blocking=True)
            attention_mask = attention_mask.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                hidden = self.model(input_ids, attention_mask)  # [B, T, H]
            out[torch.from_numpy(batch)] = mean_over_tokens(hidden, attention_mask).cpu()
        return out
