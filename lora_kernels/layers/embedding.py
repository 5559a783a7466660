"""``LoRAEmbedding``: PEFT's ``lora.Embedding`` on the fused :func:`lora_kernels.lora_embedding`."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as V
from ..ops.embedding import lora_embedding
from .base import AdapterLinear, same


def check_plain_embedding(embedding: nn.Embedding, by: str) -> None:
    """``ValueError`` unless ``embedding`` is a plain ``nn.Embedding`` lookup: its own
    ``forward`` (e.g. Gemma's ``* embed_scale``) or ``max_norm`` / ``scale_grad_by_freq`` /
    ``sparse`` (PEFT would renormalise or rescale its gathered LoRA rows) are not supported
    ``by`` the caller (the end of the message)."""
    if type(embedding).forward is not nn.Embedding.forward:
        raise ValueError(f"embedding is a {type(embedding).__name__} with its own forward; "
                         "only plain nn.Embedding lookups are supported")
    for attr in ("max_norm", "scale_grad_by_freq", "sparse"):
        if getattr(embedding, attr):
            raise ValueError(f"embedding.{attr}={getattr(embedding, attr)!r} is not supported "
                             f"{by}")


class LoRAEmbedding(AdapterLinear):
    """``y = W[ids] + scaling * A[:, ids]^T B^T`` over a frozen ``nn.Embedding`` table.

    ``weight (num_embeddings, dim)`` is the base table (``nn.Embedding``'s layout, shared with the
    module it was built from: a tied lm_head keeps reading the same storage); ``lora_A (r,
    num_embeddings)`` starts at zeros and ``lora_B (dim, r)`` normal, PEFT's init of
    ``lora_embedding_A`` / ``lora_embedding_B`` (so the layer starts at its base). ``scaling =
    alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). As PEFT, no dropout on this branch.

    As an :class:`AdapterLinear` it is the LoRA linear on one-hot rows: ``in_features =
    num_embeddings``, ``out_features = dim``, :meth:`as_lora` gives ``(lora_A, lora_B, scaling)``
    and :meth:`delta_weight` the ``(dim, num_embeddings)`` delta of that linear view (the table's
    delta is its transpose); :meth:`merged` returns an ``nn.Embedding``.
    """

    def __init__(self, weight: torch.Tensor, r: int, alpha: float = 1.0, use_rslora: bool = False,
                 padding_idx: int | None = None, backend: str | None = None):
        nn.Module.__init__(self)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            got = getattr(weight, "shape", type(weight).__name__)
            raise ValueError(f"weight must be a 2-D (num_embeddings, dim) tensor, got {got}")
        self.num_embeddings, self.embedding_dim = weight.shape
        self.in_features, self.out_features = self.num_embeddings, self.embedding_dim
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None
        self.backend = backend
        self.padding_idx = padding_idx
        V.rank("r", r)
        self.r = r
        self.alpha = V.scalar("alpha", alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, r, **kw))
        nn.init.normal_(self.lora_B)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, r: int, alpha: float = 1.0,
                       dropout: float = 0.0, use_rslora: bool = False,
                       backend: str | None = None) -> LoRAEmbedding:
        """Wrap ``embedding`` (its table is shared, not copied). ``dropout`` is accepted for
        ``inject``'s common LoRA arguments and ignored: PEFT applies none to embedding LoRA.
        ``ValueError`` for ``max_norm`` / ``scale_grad_by_freq`` / ``sparse`` embeddings (PEFT
        would renormalise or rescale its gathered LoRA rows; not implemented)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        check_plain_embedding(embedding, "by LoRAEmbedding")
        V.scalar("dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        return cls(embedding.weight, r, alpha, use_rslora, embedding.padding_idx, backend)

    def lora_factors(self, view=same):
        """``(lora_A (r, num_embeddings), lora_B (dim, r), scaling)``."""
        return view(self.lora_A), view(self.lora_B), self.scaling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (...)`` int -> ``(..., dim)``."""
        return lora_embedding(ids, self.weight, self.lora_A, self.lora_B, self.scaling,
                              padding_idx=self.padding_idx, backend=self.backend)

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` with ``W + scaling * (B A)^T`` summed in float64 and rounded
        once to the table's dtype."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        emb.weight.copy_((self.weight.double() + self.delta_weight().double().t())
                         .to(emb.weight.dtype))
        return emb

    def extra_repr(self) -> str:
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"r={self.r}, scaling={self.scaling:g}, padding_idx={self.padding_idx}, "
                f"backend={self.backend!r}")
