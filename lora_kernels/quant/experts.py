"""Quantized expert weights ``(E, out, in)``: one of this package's formats per expert, stacked.

:class:`QuantizedExperts` holds E experts of one format, each quantised exactly as its 2-D type
(:class:`~lora_kernels.quant.NF4Weight`, :class:`~lora_kernels.quant.Int8Weight`,
:class:`~lora_kernels.quant.FP8Weight`) quantises ``w[e] (out, in)``, with the per-expert
tensors stacked along a leading expert dim:

``nf4``   ``packed (E, ceil(out*in/2)) uint8``, ``absmax (E, ceil(out*in/blocksize)) fp32``,
          ``code (16,)``: each expert's values flattened row-major and cut into its own blocks.
          When ``out*in`` is a multiple of ``blocksize`` (every real expert shape) this is bit for
          bit bitsandbytes' ``quantize_4bit`` of the whole ``(E, out, in)`` tensor. Double
          quantisation of the absmax (``compress_statistics``) is not offered.
``int8``  ``qweight (E, out, in) int8``, ``scale (E, out) fp32`` (per expert output channel).
``fp8``   ``qweight (E, out, in) float8_e4m3fn``, ``scale`` fp32 ``(E, out)`` per output channel or
          ``(E, ceil(out/128), ceil(in/128))`` per 128x128 block of each expert (the layout of
          FP8 MoE checkpoints' ``weight_scale_inv``; ``w = q * scale``).

``expert(e)`` is expert e as its 2-D type (views of the stacked buffers, no copy);
``dequantize_expert(e, dtype)`` its dense ``(out, in)``; ``dequantize(dtype)`` all ``(E, out,
in)``. ``tensors()`` / ``from_tensors`` flatten it for a registered op.
"""

from __future__ import annotations

import torch

from .formats import FORMATS, NF4_BLOCKSIZES, QuantizedBuffers, QuantizedWeight

FMTS = ("nf4", "int8", "fp8")


class QuantizedExperts(QuantizedBuffers):
    """E frozen quantized expert weights of one format (see the module doc). Buffers only."""

    def __init__(self, fmt: str, shape, tensors: dict, *, blocksize: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if fmt not in FMTS:
            raise ValueError(f"fmt must be one of {FMTS}, got {fmt!r}")
        E, out_f, in_f = (int(s) for s in shape)
        self.fmt, self._shape, self.blocksize = fmt, torch.Size((E, out_f, in_f)), blocksize
        self._dtype = dtype
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self._experts: dict[int, QuantizedWeight] = {}   # expert(e), built on first use

    # ------------------------------------------------------------------------------ build
    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: str, *, blocksize: int = 64,
                   block_size: int | None = None, dtype: torch.dtype | None = None
                   ) -> QuantizedExperts:
        """Quantise ``w (E, out, in)`` expert by expert with ``FORMATS[fmt].from_float``
        (``blocksize``: NF4's; ``block_size``: FP8's ``None`` per channel or 128 per block)."""
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 3 or w.shape[0] < 1:
            raise ValueError(f"w must be (E, out, in) expert weights, got {tuple(w.shape)}")
        if fmt not in FMTS:
            raise ValueError(f"fmt must be one of {FMTS}, got {fmt!r}")
        if fmt == "nf4" and blocksize not in NF4_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES}, got {blocksize!r}")
        kw = {"nf4": dict(blocksize=blocksize), "int8": {}, "fp8": dict(block_size=block_size)}
        per = [FORMATS[fmt].from_float(w[e], dtype=dtype, **kw[fmt]) for e in range(w.shape[0])]
        return cls.from_experts(per)

    @classmethod
    def from_experts(cls, experts) -> QuantizedExperts:
        """Stack 2-D quantized weights of one format, shape and setting (one per expert)."""
        experts = list(experts)
        if not experts or not all(isinstance(q, QuantizedWeight) for q in experts):
            raise TypeError("experts must be a non-empty list of lora_kernels.quant weights")
        q0 = experts[0]
        for e, q in enumerate(experts):
            if q.fmt != q0.fmt or q.shape != q0.shape or q.dtype != q0.dtype:
                raise ValueError(f"experts[{e}] is {q.fmt} {tuple(q.shape)} {q.dtype}; expected "
                                 f"{q0.fmt} {tuple(q0.shape)} {q0.dtype} like experts[0]")
        st = lambda name: torch.stack([getattr(q, name) for q in experts])  # noqa: E731
        shape = (len(experts), *q0.shape)
        if q0.fmt == "nf4":
            if any(q.nested or q.blocksize != q0.blocksize for q in experts):
                raise ValueError("NF4 experts must share one blocksize and not be nested "
                                 "(compress_statistics=False)")
            return cls("nf4", shape, dict(packed=st("packed").reshape(len(experts), -1),
                                          absmax=st("absmax"), code=q0.code),
                       blocksize=q0.blocksize, dtype=q0.dtype)
        if q0.fmt == "fp8":
            if any(q.block_size != q0.block_size for q in experts):
                raise ValueError("FP8 experts must share one block_size")
            return cls("fp8", shape, dict(qweight=st("qweight"), scale=st("scale")),
                       blocksize=q0.block_size, dtype=q0.dtype)
        return cls(q0.fmt, shape, dict(qweight=st("qweight"), scale=st("scale")), dtype=q0.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """The stacked buffers in a fixed order (for a registered op; :meth:`from_tensors`)."""
        if self.fmt == "nf4":
            return [self.packed, self.absmax, self.code]
        return [self.qweight, self.scale]

    def meta(self) -> list[int]:
        """``[E, out, in, blocksize or 0]`` (for a registered op; :meth:`from_tensors`)."""
        return [*self._shape, self.blocksize or 0]

    @classmethod
    def from_tensors(cls, fmt: str, tensors, meta, dtype=torch.float32) -> QuantizedExperts:
        names = ("packed", "absmax", "code") if fmt == "nf4" else ("qweight", "scale")
        return cls(fmt, meta[:3], dict(zip(names, tensors)), blocksize=meta[3] or None,
                   dtype=dtype)

    def _build_expert(self, e: int) -> QuantizedWeight:
        E, out_f, in_f = self._shape
        if self.fmt == "nf4":
            return FORMATS["nf4"](self.packed[e].view(-1, 1), self.absmax[e], (out_f, in_f),
                                  self.blocksize, self._dtype, code=self.code)
        if self.fmt == "int8":
            return FORMATS["int8"](self.qweight[e], self.scale[e], self._dtype)
        return FORMATS["fp8"](self.qweight[e], self.scale[e], self.blocksize, self._dtype)

    # ------------------------------------------------------------------------------ read
    @property
    def num_experts(self) -> int:
        return self._shape[0]

    def narrow(self, start: int, length: int) -> QuantizedExperts:
        """Experts ``[start, start + length)`` as a QuantizedExperts (views, no copy)."""
        E = self._shape[0]
        if not (0 <= start and length >= 1 and start + length <= E):
            raise ValueError(f"narrow({start}, {length}) is outside the {E} experts")
        ts = [t if t.dim() == 1 else t.narrow(0, start, length) for t in self.tensors()]
        return QuantizedExperts.from_tensors(self.fmt, ts, [length, *self.meta()[1:]],
                                             self._dtype)

    def expert(self, e: int) -> QuantizedWeight:
        """Expert ``e`` as its 2-D quantized type (views of the stacked buffers)."""
        q = self._experts.get(e)
        if q is None:
            if not 0 <= e < self._shape[0]:
                raise IndexError(f"expert {e} out of range [0, {self._shape[0]})")
            q = self._experts[e] = self._build_expert(e)
        return q

    def dequantize_expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``(out, in)`` of expert ``e`` in ``dtype`` (default :attr:`dtype`)."""
        return self.expert(e).dequantize(dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense ``(E, out, in)``."""
        return torch.stack([self.expert(e).dequantize(dtype) for e in range(self._shape[0])])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._experts = {}   # expert(e) views of the old buffers
        return self

    def extra_repr(self) -> str:
        return (f"fmt={self.fmt}, shape={tuple(self._shape)}, dtype={self._dtype}, "
                f"nbytes={self.nbytes}, block={self.blocksize}")
