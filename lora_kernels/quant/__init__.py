"""Frozen quantized base weights: NF4 (bitsandbytes-compatible), int8 and FP8 (e4m3) weight-only.

One small type per format, all :class:`QuantizedWeight` (an ``nn.Module`` holding its tensors as
buffers, so ``layer.to(device)``, ``state_dict`` and ``load_state_dict`` carry them):

``NF4Weight``   bitsandbytes' NF4 layout, bit for bit. ``W (out, in)`` is flattened row-major to
                ``n = out*in`` values and cut into blocks of ``blocksize`` consecutive values (the
                last block may be partial, and blocks may straddle rows: ``in`` need not divide
                the block). Per block ``absmax_b = max |w|``; each value stores the index of the
                nearest of the 16 NF4 code values to ``w / absmax_b``; two 4-bit indices per byte,
                element ``2j`` in the high nibble, ``2j+1`` in the low one (``packed (ceil(n/2),
                1) uint8``, bnb's shape). ``absmax`` is fp32 (``nested=False``) or, as bnb's
                ``compress_statistics=True`` stores it, 8-bit codes of ``absmax - offset``
                (``offset`` = mean absmax) in blocks of 256 with bnb's signed dynamic 8-bit code
                and an fp32 ``absmax2`` per 256 blocks.
                Dequantisation: ``w = code[q] * absmax_b`` in fp32, then cast (as bnb).
``Int8Weight``  ``w = q[o, i] * scale[o]``; ``q`` int8, ``scale (out,)`` fp32 = row amax / 127.
``FP8Weight``   ``w = q[o, i] * scale``; ``q`` float8_e4m3fn; ``scale`` fp32 per output channel
                ``(out,)`` (row amax / 448) or per 128x128 block ``(ceil(out/128), ceil(in/128))``.

Common interface: ``from_float(w, ...)``, ``dequantize(dtype=None) -> (out, in)``, ``shape``,
``nbytes`` (bytes of every stored tensor), ``device``, ``dtype`` (the compute dtype a plain
``dequantize()`` returns; ``module.to(dtype)`` changes it, never the stored codes or scales),
``.to(device)``. ``NF4Weight.from_bnb(param)`` wraps a ``bnb.nn.Params4bit`` (or a ``Linear4bit``)
as it is: its packed codes and statistics are referenced, not copied or re-quantised.

bitsandbytes is optional: nothing here imports it unless ``from_bnb`` is called.

Modules: :mod:`.formats` (the three formats, ``quantize``), :mod:`.experts`
(``QuantizedExperts``: one format stacked over MoE experts).
"""

from .experts import QuantizedExperts
from .formats import (
    FORMATS,
    FP8_BLOCK,
    FP8_MAX,
    NESTED_BLOCKSIZE,
    NF4_BLOCKSIZES,
    NF4_CODE,
    FP8Weight,
    Int8Weight,
    NF4Weight,
    QuantizedWeight,
    check_fp8_device,
    dynamic_code,
    is_bnb_linear4bit,
    is_quantized,
    layer_base,
    quantize,
)

__all__ = ["FORMATS", "FP8_BLOCK", "FP8_MAX", "FP8Weight", "Int8Weight", "NESTED_BLOCKSIZE",
           "NF4Weight", "NF4_BLOCKSIZES", "NF4_CODE", "QuantizedExperts", "QuantizedWeight",
           "check_fp8_device", "dynamic_code", "is_bnb_linear4bit", "is_quantized", "layer_base",
           "quantize"]
