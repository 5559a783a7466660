""":class:`ServingEmbedding`: the served form of an ``nn.Embedding`` with embedding-LoRA adapters
(PEFT's ``lora.Embedding``) in :class:`~lora_kernels.MultiAdapterModel`.

Each adapter is kept in an :class:`~lora_kernels.AdapterPool` as the LoRA of the table's one-hot
linear view (``in_features = num_embeddings``, ``out_features = embedding_dim``: ``lora_A (r, V)``,
``lora_B (dim, r)``, PEFT's ``lora_embedding_A`` / ``lora_embedding_B``), so the adapter store
validates, swaps and counts it like any other module. Per token ``t`` of a sequence served by
slot ``k``: ``y[t] = W[id] + s_k A_k[:, id]^T B_k^T`` (:func:`lora_kernels.multi_lora_embedding`:
a gather of the slot's rank-r column, no dense delta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._backend import resolve_backend
from .layers.embedding import check_plain_embedding
from .ops.embedding import multi_lora_embedding


class ServingEmbedding(nn.Module):
    """Drop-in for an ``nn.Embedding`` that adds, for every token, the embedding LoRA its
    sequence picked (``state``: the owning server's per-call selection, see
    :class:`~lora_kernels.serving.ServingLinear`). ``ids`` must be batch-first ``(batch, ...)``.
    Outside a server call (or with no adapter loaded) it is the plain lookup."""

    def __init__(self, embedding: nn.Embedding, pool, state, backend: str | None = None):
        super().__init__()
        check_plain_embedding(embedding, "for a served embedding")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self.bias = None
        self.pool = pool
        self._state = state
        self.backend = backend
        self.dora_g: dict[str, torch.Tensor] = {}    # (DoRA is refused for embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        st = self._state
        if not st.applies() or len(self.pool) == 0:
            return F.embedding(ids, self.weight, self.padding_idx)
        batch = st.seq_ids.shape[1]
        if ids.dim() < 1 or ids.shape[0] != batch:
            raise ValueError(f"ServingEmbedding expects batch-first ids (batch={batch}, ...), got "
                             f"shape {tuple(ids.shape)}")
        per_seq = ids.numel() // batch if batch else 0
        be = resolve_backend(self.backend, ids.device, "multi_lora_embedding")
        view = self.pool.view()
        seq = st.seq_ids.to(ids.device)
        y = None
        for j in range(seq.shape[0]):      # summed adapters: one more pass per extra part
            slots = seq[j].repeat_interleave(per_seq).view(ids.shape)
            part = multi_lora_embedding(ids, self.weight, view, slots, backend=be)
            y = part if y is None else y + (part - F.embedding(ids, self.weight))
        return y

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"adapters={len(self.pool)}")


def check_embedding_entries(adapter, layers) -> None:
    """``ValueError`` naming the module when an entry for a served embedding is for another
    vocabulary size or dimension (the store checks the rest of every entry)."""
    if not hasattr(adapter, "items"):
        return
    for mod, entry in adapter.items():
        lay = layers.get(mod)
        if not isinstance(lay, ServingEmbedding) or not isinstance(entry, (tuple, list)):
            continue
        if len(entry) == 4:
            raise ValueError(f"adapter[{mod!r}]: DoRA on an embedding is not supported")
        A, B = entry[0], entry[1]
        if isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[1] != lay.num_embeddings:
            raise ValueError(f"adapter[{mod!r}] is an embedding LoRA for a vocabulary of "
                             f"{A.shape[1]} tokens (lora_embedding_A {tuple(A.shape)}) but the "
                             f"model's {mod!r} has num_embeddings={lay.num_embeddings}")
        if isinstance(B, torch.Tensor) and B.dim() == 2 and B.shape[0] != lay.embedding_dim:
            raise ValueError(f"adapter[{mod!r}] is an embedding LoRA of dim {B.shape[0]} but the "
                             f"model's {mod!r} has embedding_dim={lay.embedding_dim}")
