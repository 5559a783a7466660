"""The weight formats of :mod:`lora_kernels.quant` (see the package docstring): NF4, int8, FP8
as :class:`QuantizedWeight` modules, ``quantize``, and the helpers the layers read."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FP8Weight", "Int8Weight", "NF4Weight", "QuantizedBuffers", "QuantizedWeight",
           "is_quantized", "quantize", "NF4_CODE", "NF4_BLOCKSIZES", "dynamic_code"]

# bitsandbytes' NF4 code (functional.get_4bit_type("nf4")), sorted ascending.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256   # bnb quantises the absmax in blocks of 256 (compress_statistics=True)
FP8_MAX = 448.0          # largest finite float8_e4m3fn
FP8_BLOCK = 128


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit code (``functional.create_dynamic_map()``), 256 fp32
    values sorted ascending: the code of the double-quantised absmax."""
    data: list[float] = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        n = int(2 ** (i + non_sign - max_exp) + 1)
        b = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-(max_exp - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exp - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    return torch.tensor(sorted(data), dtype=torch.float32)


def is_quantized(w) -> bool:
    """Whether ``w`` is one of this module's quantized weights."""
    return isinstance(w, QuantizedWeight)


def check_fp8_device(device: torch.device) -> None:
    """FP8 weights need a GPU with FP8 conversions (compute capability >= 8.9) on CUDA; checked
    when a kernel is about to use them (never at import)."""
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ValueError(f"FP8Weight needs a GPU with FP8 support (compute capability >= 8.9)"
                             f"; {device} has {cap[0]}.{cap[1]}: use Int8Weight or NF4Weight")


def _float_weight(w, name="w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) weight, got shape {tuple(w.shape)}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")
    return w.detach()


def _compute_dtype(dtype, default) -> torch.dtype:
    dtype = default if dtype is None else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"dtype must be float32/float16/bfloat16, got {dtype}")
    return dtype


class QuantizedBuffers(nn.Module):
    """Base of :class:`QuantizedWeight` (2-D) and ``QuantizedExperts`` (3-D): frozen buffers
    with a dense ``shape`` (``self._shape``) and a compute dtype (``self._dtype``) that
    subclasses set. Not trainable: the ops never return a gradient for it."""

    fmt: str = ""

    @property
    def shape(self) -> torch.Size:
        """Shape of the dense weight: ``(out, in)``, or ``(E, out, in)`` for experts."""
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype: what ``dequantize()`` returns by default."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers())).device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes and scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dim(self) -> int:
        return len(self._shape)

    def double(self) -> torch.Tensor:
        """The dense float64 weight (as ``w.double()`` of a dense one: merges and references
        read the base this way). Unlike ``nn.Module.double`` this returns a tensor."""
        return self.dequantize(torch.float64)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight in ``dtype`` (default :attr:`dtype`)."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        # nn.Module.to / .cuda / .half reach here. Codes and scales keep their dtypes (a bf16
        # absmax would no longer be bnb's); only the device moves, and a float dtype
        # conversion changes the compute dtype.
        probe = fn(torch.empty(0, dtype=self._dtype, device=self.device))
        if probe.device.type == "cuda" and self.fmt == "fp8":
            check_fp8_device(probe.device)
        for name, b in list(self._buffers.items()):
            if b is not None and b.device != probe.device:
                self._buffers[name] = b.to(probe.device)
        if probe.dtype.is_floating_point:
            self._dtype = probe.dtype
        return self


class QuantizedWeight(QuantizedBuffers):
    """Base of the quantized weight types (see the module doc). Not trainable: it has buffers
    only, and the ops never return a gradient for it."""

    def __init__(self, shape, dtype: torch.dtype):
        super().__init__()
        self._shape = torch.Size(int(s) for s in shape)
        self._dtype = _compute_dtype(dtype, torch.float32)

    # -- interface -------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self._shape[0]

    @property
    def in_features(self) -> int:
        return self._shape[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out, in)`` weight in ``dtype`` (default :attr:`dtype`)."""
        raise NotImplementedError

    def requantize(self, w: torch.Tensor) -> QuantizedWeight:
        """A new weight of this format and these settings quantising the dense ``w``."""
        raise NotImplementedError

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """``dequantize().index_select(dim, index)`` without the dense weight: only the selected
        rows (dim 0) or columns (dim 1) are dequantised (CURLoRA's R and C, every call)."""
        out_f, in_f = self._shape
        dev = self.device
        if dim == 0:
            w = _gather(self, index, torch.arange(in_f, device=dev))
        elif dim == 1:
            w = _gather(self, torch.arange(out_f, device=dev), index)
        else:
            raise ValueError(f"dim must be 0 or 1, got {dim}")
        return w.to(self._dtype)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self._shape)}, dtype={self._dtype}, "
                f"nbytes={self.nbytes}{self._settings()}")

    def _settings(self) -> str:
        return ""

    def _check_dense(self, w, name="w"):
        w = _float_weight(w, name)
        if w.shape != self._shape:
            raise ValueError(f"{name} must have shape {tuple(self._shape)}, got {tuple(w.shape)}")
        return w


# =============================================================================== NF4
def _nf4_quantize_flat(flat: torch.Tensor, blocksize: int, code: torch.Tensor):
    """bitsandbytes' blockwise 4-bit quantisation of a flat fp32 vector: (q uint8 per value,
    absmax fp32 per block). Scale by the reciprocal of the block absmax, clamp to [-1, 1], pick the
    nearest code value by the midpoints (ties go up, as torch.bucketize / bnb)."""
    n = flat.numel()
    nb = -(-n // blocksize)
    pad = nb * blocksize - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(nb, blocksize)
    # padding zeros never raise a block's absmax (|w| >= 0)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled.reshape(-1)[:n], bounds, out_int32=True).to(torch.uint8)
    return q, absmax


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    if q.numel() % 2:  # bnb pads the scaled values with 0.0, whose NF4 index is 7
        q = torch.cat([q, q.new_full((1,), NF4_CODE.index(0.0))])
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


def _quantize_blockwise8(a: torch.Tensor, code: torch.Tensor, blocksize: int):
    """Blockwise 8-bit quantisation as bitsandbytes' portable implementation
    (``backends/default`` ``quantize_blockwise``; the CUDA kernel rounds the same way) of a flat
    fp32 vector: (codes uint8, absmax fp32 per block); ``a * (1/absmax)`` clamped to [-1, 1], the
    nearest code value by midpoints. bnb's native CPU kernel (``quantize_cpu``) picks the other
    neighbour for some values close to a midpoint (measured: up to ~10% of the gap from it, for
    the small-magnitude codes), so a few nested absmax codes can differ by one step from a
    bnb-on-CPU quantisation; a state bnb produced is always read as it is (``from_bnb``)."""
    n = a.numel()
    nb = -(-n // blocksize)
    blocks = torch.nn.functional.pad(a, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled.reshape(-1)[:n], bounds, out_int32=True)
    # an all-zero block (absmax 0): bnb's kernels compute 0/0 and store index 0
    q = torch.where((absmax == 0).repeat_interleave(blocksize)[:n], 0, q)
    return q.to(torch.uint8), absmax


class NF4Weight(QuantizedWeight):
    """NF4 weight in bitsandbytes' layout (see the module doc).

    Buffers: ``packed ((n+1)//2, 1) uint8``, ``code (16,) fp32``, ``absmax`` (``(nblocks,)`` fp32,
    or uint8 codes when ``nested``) and, when nested, ``absmax2 (ceil(nblocks/256),) fp32``,
    ``code2 (256,) fp32``, ``offset () fp32``. ``n = out*in``, ``nblocks = ceil(n/blocksize)``.
    """

    fmt = "nf4"

    def __init__(self, packed, absmax, shape, blocksize, dtype=torch.float32, *, code=None,
                 absmax2=None, code2=None, offset=None):
        super().__init__(shape, dtype)
        if blocksize not in NF4_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES} (bitsandbytes' block "
                             f"sizes), got {blocksize!r}")
        self.blocksize = int(blocksize)
        n = self._shape.numel()
        nb = -(-n // blocksize)
        if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed must be uint8 with (out*in+1)//2 = {(n + 1) // 2} bytes, got "
                             f"{packed.dtype} with {packed.numel()}")
        self.nested = absmax2 is not None
        want = torch.uint8 if self.nested else torch.float32
        if absmax.dtype != want or absmax.numel() != nb:
            raise ValueError(f"absmax must be {want} with ceil(out*in/blocksize) = {nb} entries, "
                             f"got {absmax.dtype} with {absmax.numel()}")
        dev = packed.device
        if code is None:
            code = torch.tensor(NF4_CODE, dtype=torch.float32, device=dev)
        tensors = dict(packed=packed, code=code, absmax=absmax)
        if self.nested:
            if code2 is None or offset is None:
                raise ValueError("a nested absmax needs code2 and offset")
            n2 = -(-nb // NESTED_BLOCKSIZE)
            if absmax2.dtype != torch.float32 or absmax2.numel() != n2:
                raise ValueError(f"absmax2 must be float32 with ceil(nblocks/256) = {n2} entries,"
                                 f" got {absmax2.dtype} with {absmax2.numel()}")
            tensors.update(absmax2=absmax2, code2=code2,
                           offset=offset.reshape(()).to(torch.float32))
        for name, t in tensors.items():
            if t.device != dev:
                raise ValueError(f"{name} must be on {dev} (like packed), got {t.device}")
            self.register_buffer(name, t)

    # ---------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, w, blocksize: int = 64, compress_statistics: bool = False,
                   dtype: torch.dtype | None = None) -> NF4Weight:
        """Quantise ``w (out, in)`` exactly as ``bitsandbytes.functional.quantize_4bit(w,
        blocksize, compress_statistics, quant_type="nf4")`` does; ``dtype`` defaults to w's."""
        w = _float_weight(w)
        if blocksize not in NF4_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {NF4_BLOCKSIZES} (bitsandbytes' block "
                             f"sizes), got {blocksize!r}")
        dtype = _compute_dtype(dtype, w.dtype if w.dtype != torch.float64 else torch.float32)
        code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
        q, absmax = _nf4_quantize_flat(w.reshape(-1).float(), blocksize, code)
        packed = _pack_nibbles(q)
        if not compress_statistics:
            return cls(packed, absmax, w.shape, blocksize, dtype, code=code)
        offset = absmax.mean()
        code2 = dynamic_code().to(w.device)
        qa, absmax2 = _quantize_blockwise8(absmax - offset, code2, NESTED_BLOCKSIZE)
        return cls(packed, qa, w.shape, blocksize, dtype, code=code, absmax2=absmax2,
                   code2=code2, offset=offset)

    @classmethod
    def from_bnb(cls, param) -> NF4Weight:
        """Wrap a quantised ``bnb.nn.Params4bit`` (or a ``bnb.nn.Linear4bit``, whose weight is
        taken) as it is: its packed codes and quant-state tensors are referenced, not copied."""
        if isinstance(param, nn.Module) and hasattr(param, "weight"):
            param = param.weight
        qs = getattr(param, "quant_state", None)
        if type(param).__name__ != "Params4bit":
            raise TypeError(f"from_bnb expects a bitsandbytes Params4bit or Linear4bit, got "
                            f"{type(param).__name__}")
        if not getattr(param, "bnb_quantized", False) or qs is None:
            raise ValueError("the Params4bit was never quantised (bitsandbytes quantises it when "
                             "it is moved to a device: call linear.to(device) first)")
        if qs.quant_type != "nf4":
            raise ValueError(f"only quant_type='nf4' is supported, got {qs.quant_type!r}")
        if getattr(qs, "packing_format_for_cpu", False):
            raise ValueError("this Params4bit was repacked for bitsandbytes' CPU inference kernel "
                             "(a Linear4bit run in eval mode without grad on an AVX512-BF16 CPU); "
                             "wrap it before such a forward, or after moving it to another "
                             "device and back")
        if len(qs.shape) != 2:
            raise ValueError(f"quant_state.shape must be 2-D (out, in), got {tuple(qs.shape)}")
        packed = param.data
        if packed.dtype != torch.uint8:       # quant_storage other than uint8: same bytes
            packed = packed.view(torch.uint8)
        kw = dict(code=qs.code.to(torch.float32) if qs.code is not None else None)
        if qs.nested:
            s2 = qs.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested absmax blocksize must be 256, got {s2.blocksize}")
            kw.update(absmax2=s2.absmax, code2=s2.code, offset=qs.offset)
        return cls(packed, qs.absmax, qs.shape, qs.blocksize, qs.dtype, **kw)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block absmax in fp32, ``(nblocks,)`` (bnb: ``code2[q] * absmax2[b // 256] +
        offset`` when nested)."""
        if not self.nested:
            return self.absmax
        nb = self.absmax.numel()
        a2 = self.absmax2.repeat_interleave(NESTED_BLOCKSIZE)[:nb]
        return self.code2[self.absmax.long()] * a2 + self.offset

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = _compute_dtype(dtype, self._dtype)
        n = self._shape.numel()
        bs = self.blocksize
        # one gather per byte from a 256-entry table of (code[b >> 4], code[b & 15]) pairs, each
        # pair one 8-byte element (an int64 view: torch's index_select copies 1-D scalars ~4x
        # faster than 2-float rows: 2.2 vs 8.3 ms for 2M bytes on the CI box), then code * absmax
        # in fp32 in place, block by block (bnb's arithmetic, bit for bit)
        lut = torch.stack([self.code.repeat_interleave(16), self.code.repeat(16)], 1)
        pairs = torch.index_select(lut.view(torch.int64).reshape(256), 0,
                                   self.packed.reshape(-1).int())
        vals = pairs.view(torch.float32)[:n]
        a = self.absmax_fp32()
        full = (n // bs) * bs
        vals[:full].view(-1, bs).mul_(a[:full // bs, None])
        if full < n:
            vals[full:].mul_(a[-1])
        return vals.view(self._shape).to(dtype)

    def requantize(self, w) -> NF4Weight:
        return NF4Weight.from_float(self._check_dense(w), self.blocksize, self.nested,
                                    dtype=self._dtype)

    def _settings(self) -> str:
        return f", blocksize={self.blocksize}, nested={self.nested}"


# =============================================================================== int8
class Int8Weight(QuantizedWeight):
    """Weight-only int8, symmetric per output channel: ``w[o, i] = q[o, i] * scale[o]``.

    Buffers ``qweight (out, in) int8``, ``scale (out,) fp32``.
    """

    fmt = "int8"

    def __init__(self, qweight, scale, dtype=torch.float32):
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D int8 tensor, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        super().__init__(qweight.shape, dtype)
        if scale.dtype != torch.float32 or tuple(scale.shape) != (qweight.shape[0],):
            raise ValueError(f"scale must be float32 of shape ({qweight.shape[0]},), got "
                             f"{scale.dtype} {tuple(scale.shape)}")
        if scale.device != qweight.device:
            raise ValueError(f"scale must be on {qweight.device} (like qweight), got "
                             f"{scale.device}")
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.contiguous())

    @classmethod
    def from_float(cls, w, dtype=None) -> Int8Weight:
        """``scale[o] = max_i |w[o, i]| / 127``; ``q = round(w / scale)`` (a zero row keeps
        scale 1 and q = 0). ValueError for a non-finite entry (int8 has no NaN/inf: a NaN row
        would otherwise be stored as scale 1, q = round(w), silently finite)."""
        w = _float_weight(w)
        dtype = _compute_dtype(dtype, w.dtype if w.dtype != torch.float64 else torch.float32)
        wf = w.float()
        bad = ~torch.isfinite(wf).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"w has non-finite entries (NaN/inf; in float32) in rows {rows}"
                             f"{'...' if int(bad.sum()) > 5 else ''}: int8 cannot represent "
                             "them")
        amax = wf.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.clamp(torch.round(wf / scale[:, None]), -127, 127).to(torch.int8)
        return cls(q, scale, dtype)

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = _compute_dtype(dtype, self._dtype)
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def requantize(self, w) -> Int8Weight:
        return Int8Weight.from_float(self._check_dense(w), dtype=self._dtype)


# =============================================================================== FP8
class FP8Weight(QuantizedWeight):
    """Weight-only FP8 (e4m3fn): ``w[o, i] = q[o, i] * scale``, with ``scale (out,)`` per output
    channel (``block_size=None``) or ``(ceil(out/128), ceil(in/128))`` per 128x128 block
    (``block_size=128``; edge blocks may be partial).

    Buffers ``qweight (out, in) float8_e4m3fn``, ``scale`` fp32.
    """

    fmt = "fp8"

    def __init__(self, qweight, scale, block_size=None, dtype=torch.float32):
        if qweight.dtype != torch.float8_e4m3fn or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D float8_e4m3fn tensor, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        if block_size not in (None, FP8_BLOCK):
            raise ValueError(f"block_size must be None (per output channel) or {FP8_BLOCK} "
                             f"(128x128 blocks), got {block_size!r}")
        super().__init__(qweight.shape, dtype)
        out_f, in_f = qweight.shape
        want = ((out_f,) if block_size is None
                else (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)))
        if scale.dtype != torch.float32 or tuple(scale.shape) != want:
            raise ValueError(f"scale must be float32 of shape {want}, got {scale.dtype} "
                             f"{tuple(scale.shape)}")
        if scale.device != qweight.device:
            raise ValueError(f"scale must be on {qweight.device} (like qweight), got "
                             f"{scale.device}")
        self.block_size = block_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scale", scale.contiguous())

    @classmethod
    def from_float(cls, w, block_size=None, dtype=None) -> FP8Weight:
        """``scale = amax / 448`` over each output row (``block_size=None``) or each 128x128
        block; ``q = e4m3(w / scale)`` (round to nearest even). Raises on a CUDA GPU without FP8."""
        w = _float_weight(w)
        check_fp8_device(w.device)
        if block_size not in (None, FP8_BLOCK):
            raise ValueError(f"block_size must be None (per output channel) or {FP8_BLOCK} "
                             f"(128x128 blocks), got {block_size!r}")
        dtype = _compute_dtype(dtype, w.dtype if w.dtype != torch.float64 else torch.float32)
        wf = w.float()
        if block_size is None:
            amax = wf.abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            full = scale[:, None]
        else:
            o, i = wf.shape
            bo, bi = -(-o // FP8_BLOCK), -(-i // FP8_BLOCK)
            pad = torch.nn.functional.pad(wf.abs(), (0, bi * FP8_BLOCK - i, 0, bo * FP8_BLOCK - o))
            amax = pad.view(bo, FP8_BLOCK, bi, FP8_BLOCK).amax(dim=(1, 3))
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            full = _expand_blocks(scale, o, i)
        q = torch.clamp(wf / full, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scale, block_size, dtype)

    def scale_full(self) -> torch.Tensor:
        """The scale broadcast to ``(out, 1)`` or ``(out, in)`` (blocks expanded)."""
        if self.block_size is None:
            return self.scale[:, None]
        return _expand_blocks(self.scale, *self._shape)

    def dequantize(self, dtype=None) -> torch.Tensor:
        dtype = _compute_dtype(dtype, self._dtype)
        return (self.qweight.float() * self.scale_full()).to(dtype)

    def requantize(self, w) -> FP8Weight:
        return FP8Weight.from_float(self._check_dense(w), self.block_size, dtype=self._dtype)

    def _settings(self) -> str:
        return f", block_size={self.block_size}"


def _expand_blocks(scale: torch.Tensor, o: int, i: int) -> torch.Tensor:
    return scale.repeat_interleave(FP8_BLOCK, 0)[:o].repeat_interleave(FP8_BLOCK, 1)[:, :i]


FORMATS = {"nf4": NF4Weight, "int8": Int8Weight, "fp8": FP8Weight}


def quantize(w: torch.Tensor, fmt: str, **kwargs) -> QuantizedWeight:
    """``FORMATS[fmt].from_float(w, **kwargs)``; ``fmt`` one of ``"nf4" | "int8" | "fp8"``."""
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise ValueError(f"quantize must be one of {sorted(FORMATS)}, got {fmt!r}")
    return FORMATS[fmt].from_float(w, **kwargs)


# =============================================================================== layers
def is_bnb_linear4bit(module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (checked by its weight's type name, so
    bitsandbytes is not imported)."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


def layer_base(linear, quantize: str | None):
    """``(linear_for_init, qweight)`` for an adapter layer's ``from_linear``.

    * a bnb ``Linear4bit``: its weight wrapped as it is (:meth:`NF4Weight.from_bnb`); ``quantize``
      must be None or ``"nf4"``;
    * ``quantize="nf4" | "int8" | "fp8"`` with an ``nn.Linear``: ``quantize(linear.weight, fmt)``
      (NF4: bnb's ``Linear4bit`` defaults, blocksize 64 with double quantisation);
    * otherwise ``(linear, None)``.

    ``linear_for_init`` is an ``nn.Linear`` holding the *dequantised* weight, for the layer's
    constructor only: methods that read W at init (NoRA's SVD, CURLoRA's index sampling, DoRA's
    column norms) see deq(W) once; the layer then swaps its weight for the quantized one.
    """
    if is_bnb_linear4bit(linear):
        if quantize not in (None, "nf4"):
            raise ValueError(f"a bitsandbytes Linear4bit is already NF4; quantize must be None "
                             f"or 'nf4', got {quantize!r}")
        qw = NF4Weight.from_bnb(linear.weight)
    elif quantize is None:
        return linear, None
    else:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"quantize= needs an nn.Linear, got {type(linear).__name__}")
        kw = dict(blocksize=64, compress_statistics=True) if quantize == "nf4" else {}
        qw = _quantize(linear.weight, quantize, **kw)
    dense = qw.dequantize()
    proxy = nn.Linear(qw.in_features, qw.out_features, bias=False, device="meta")
    proxy.weight = nn.Parameter(dense, requires_grad=False)
    bias = getattr(linear, "bias", None)
    proxy.bias = (nn.Parameter(bias.detach().to(dense.dtype), requires_grad=False)
                  if bias is not None else None)
    return proxy, qw


_quantize = quantize  # layer_base's argument shadows the function


def _gather(qw: QuantizedWeight, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 ``W[rows[:, None], cols[None, :]]`` dequantising only those elements."""
    rows = rows.to(torch.int64)
    cols = cols.to(torch.int64)
    if qw.fmt == "nf4":
        f = rows[:, None] * qw.in_features + cols[None, :]
        byte = qw.packed.reshape(-1)[f // 2].to(torch.int64)
        q = torch.where(f % 2 == 0, byte >> 4, byte & 15)
        return qw.code[q] * qw.absmax_fp32()[f // qw.blocksize]
    q = qw.qweight[rows[:, None], cols[None, :]].float()
    if qw.fmt == "fp8" and qw.block_size is not None:
        return q * qw.scale[(rows // FP8_BLOCK)[:, None], (cols // FP8_BLOCK)[None, :]]
    return q * qw.scale[rows][:, None]
