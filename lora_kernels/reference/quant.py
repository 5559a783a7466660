"""Float64 reference dequantisers of the quantized weight formats (``lora_kernels.quant``),
written from the format definitions independently of the types' own ``dequantize``:

    NF4   w[f] = NF4[q_f] * absmax[f // blocksize],   f = o*in + i (row-major flat index),
          q_f = high nibble of byte f//2 if f is even, else its low nibble;
          nested: absmax[b] = code2[qa_b] * absmax2[b // 256] + offset
    int8  w[o, i] = q[o, i] * scale[o]
    FP8   w[o, i] = e4m3(q[o, i]) * scale[o]            (per channel)
          w[o, i] = e4m3(q[o, i]) * scale[o//128, i//128] (128x128 blocks)

Every product is taken in float64 (no fp32 rounding), so ``dequantize_ref(qw)`` is the exact value
the codes and scales represent.
"""

from __future__ import annotations

import torch


def dequantize_ref(qw) -> torch.Tensor:
    """``(out, in)`` float64 dense weight of ``qw`` (NF4Weight / Int8Weight / FP8Weight), on CPU."""
    out_f, in_f = qw.shape
    if qw.fmt == "nf4":
        n = out_f * in_f
        f = torch.arange(n, dtype=torch.int64)
        byte = qw.packed.reshape(-1).cpu().to(torch.int64)[f // 2]
        q = torch.where(f % 2 == 0, byte >> 4, byte & 15)
        code = qw.code.cpu().double()
        blk = f // qw.blocksize
        if qw.nested:
            qa = qw.absmax.cpu().to(torch.int64)
            a2 = qw.absmax2.cpu().double()
            nb = qa.numel()
            b = torch.arange(nb)
            absmax = qw.code2.cpu().double()[qa] * a2[b // 256] + qw.offset.cpu().double()
        else:
            absmax = qw.absmax.cpu().double()
        return (code[q] * absmax[blk]).view(out_f, in_f)
    if qw.fmt == "int8":
        return qw.qweight.cpu().double() * qw.scale.cpu().double()[:, None]
    if qw.fmt == "fp8":
        q = qw.qweight.cpu().double()
        s = qw.scale.cpu().double()
        if qw.block_size is None:
            return q * s[:, None]
        o = torch.arange(out_f) // qw.block_size
        i = torch.arange(in_f) // qw.block_size
        return q * s[o[:, None], i[None, :]]
    raise TypeError(f"not a quantized weight: {type(qw).__name__}")
