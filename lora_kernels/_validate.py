"""Argument checks shared by every op. Each raises ``TypeError``/``ValueError`` naming the argument
and what was expected, before any kernel reads memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def float_tensor(name: str, t, **kw) -> torch.Tensor:
    tensor(name, t, **kw)
    if t.dtype not in FLOAT_DTYPES and t.dtype != torch.float64:
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}, got {tuple(t.shape)}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} must have dtype {ref.dtype} (like {ref_name}), got {t.dtype}")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"{name} must be on {ref.device} (like {ref_name}), got {t.device}"
            )


_F32_MAX = float(torch.finfo(torch.float32).max)


def no_overlap(name: str, t: torch.Tensor) -> None:
    """ValueError if two elements of ``t`` share memory (an expanded tensor, a stride-0 or
    overlapping ``as_strided`` view): an in-place update of it is ill-defined. Exact for
    strides sorted ascending: dim ``i`` must step past everything dims ``< i`` reach."""
    reach = 0
    for st, sz in sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if st <= reach:
            raise ValueError(f"{name} has overlapping elements (shape {tuple(t.shape)}, strides "
                             f"{t.stride()}, e.g. an expand()ed tensor): it cannot be updated "
                             f"in place; pass {name}.clone()")
        reach += st * (sz - 1)


def scaling32(name: str, v) -> float:
    """A LoRA scaling stored as float32 (pools, stores): a Python float (or int / 1-element
    tensor) that is finite *in float32* -- ``1e39`` is finite in Python but overflows there."""
    v = scalar(name, v)
    if not math.isfinite(v) or not math.isfinite(float(torch.tensor(v, dtype=torch.float64)
                                                      .to(torch.float32))):
        raise ValueError(f"{name} must be finite in float32 (|{name}| <= {_F32_MAX:.4g}, the "
                         f"pool stores it as float32), got {v}")
    return v


def scalar(name: str, v, *, lo: float | None = None, hi: float | None = None,
           hi_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad:
            v = v.item()
        else:
            raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    v = float(v)
    if v != v:
        raise ValueError(f"{name} must not be NaN")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def positive_int(name: str, v) -> int:
    """``v`` itself if it is an int >= 1 (not a bool), else TypeError / ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


def adapter_name(name) -> str:
    """``name`` itself if it is a non-empty str (an adapter's name), else TypeError / ValueError."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("name must be a non-empty string")
    return name


def rank(name: str, r, *, max_rank: int | None = None, what: str = "") -> int:
    positive_int(name, r)
    if max_rank is not None and r > max_rank:
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must be <= {max_rank}{hint}, got {r}")
    return r


def linear_args(x, weight, bias) -> tuple[int, int]:
    """Check ``x (..., in)``, ``weight (out, in)``, ``bias (out,) | None``; return (in, out)."""
    float_tensor("x", x, min_ndim=1)
    float_tensor("weight", weight, ndim=2)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(
            f"x must have last dim in_features={in_f} (weight is {tuple(weight.shape)}), "
            f"got x of shape {tuple(x.shape)}"
        )
    same_dtype("x", x, weight=weight)
    same_device("x", x, weight=weight)
    if bias is not None:
        float_tensor("bias", bias, ndim=1)
        shape("bias", bias, (out_f,), "out_features")
        same_dtype("x", x, bias=bias)
        same_device("x", x, bias=bias)
    return in_f, out_f


_ALL_FLOATS = frozenset((*FLOAT_DTYPES, torch.float64))


def lora_args(x, weight, bias, lora_A, lora_B) -> tuple[int, int]:
    """:func:`linear_args` + :func:`lora_factors` for the common valid case in one expression
    (~4 us instead of ~25 us on a 2-core CPU: the per-call cost of a decode-size layer); any
    failed condition falls back to the detailed checks, which raise the precise error."""
    T = torch.Tensor
    if (isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T)
            and isinstance(lora_B, T) and (bias is None or isinstance(bias, T))):
        dt, dev = x.dtype, x.device
        ws, As, Bs = weight.shape, lora_A.shape, lora_B.shape
        if (dt in _ALL_FLOATS and len(ws) == 2 and len(As) == 2 and len(Bs) == 2
                and x.dim() >= 1 and x.shape[-1] == ws[1] and As[1] == ws[1] and As[0] >= 1
                and Bs[0] == ws[0] and Bs[1] == As[0]
                and weight.dtype == dt and lora_A.dtype == dt and lora_B.dtype == dt
                and weight.device == dev and lora_A.device == dev and lora_B.device == dev
                and (bias is None or (bias.shape == ws[:1] and bias.dtype == dt
                                      and bias.device == dev))):
            return ws[1], ws[0]
    in_f, out_f = linear_args(x, weight, bias)
    lora_factors(lora_A, lora_B, x, in_f, out_f)
    return in_f, out_f


def lora_factors(lora_A, lora_B, x, in_f: int, out_f: int,
                 names: tuple[str, str] = ("lora_A", "lora_B")) -> int:
    """Check ``lora_A (r, in)``, ``lora_B (out, r)`` against x; return r."""
    na, nb = names
    float_tensor(na, lora_A, ndim=2)
    float_tensor(nb, lora_B, ndim=2)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"{na} must have rank >= 1 rows, got shape {tuple(lora_A.shape)}")
    shape(na, lora_A, (r, in_f), "(r, in_features)")
    shape(nb, lora_B, (out_f, r), f"(out_features, r) with r={r} from {na}")
    same_dtype("x", x, **{na: lora_A, nb: lora_B})
    same_device("x", x, **{na: lora_A, nb: lora_B})
    return r


# ----------------------------------------------------------------------------- adapter ids
def adapter_ids(name: str, ids, num_tokens: int) -> torch.Tensor:
    """Type and shape of per-token adapter ids: a 1-D int32/int64 tensor (or a list of ints) of
    length ``num_tokens``; returns it as a tensor (values are checked by :func:`ids_in_slots`)."""
    if isinstance(ids, (list, tuple)):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"{name} as a list must hold ints")
        ids = torch.tensor(ids, dtype=torch.int64)
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an int32/int64 tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype int32 or int64, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != num_tokens:
        raise ValueError(f"{name} must have shape ({num_tokens},) (one id per token of x), "
                         f"got {tuple(ids.shape)}")
    return ids


def ids_in_slots(name: str, ids: torch.Tensor, max_adapters: int,
                 occupied: torch.Tensor | None = None, loaded: str = "") -> None:
    """THE adapter-id check (every caller uses this one): each id is ``-1`` (base only) or a slot
    in ``[0, max_adapters)``, and, when ``occupied`` (bool ``(max_adapters,)`` on ids' device) is
    given, an occupied slot. Raises ``ValueError`` naming the first bad token. One host read of
    one bool (a device sync when ids live on a GPU)."""
    if ids.numel() == 0:
        return
    bad = (ids < -1) | (ids >= max_adapters)
    free = None
    if occupied is not None:
        free = (ids >= 0) & ~bad & ~occupied[ids.clamp(0, max_adapters - 1).long()]
        if not bool((bad | free).any()):
            return
    elif not bool(bad.any()):
        return
    if bool(bad.any()):
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{t}] = {int(ids[t])} is outside the pool: ids must be -1 "
                         f"(base only) or a slot in [0, {max_adapters})")
    t = int(free.nonzero()[0, 0])
    raise ValueError(f"{name}[{t}] = {int(ids[t])} names a free slot (no adapter loaded "
                     f"there{'; loaded: ' + loaded if loaded else ''})")


def lora_triple(name: str, ad) -> tuple:
    """``(lora_A (r, in), lora_B (out, r), scaling float)`` of an adapter given as that tuple
    (same device, shared rank), else TypeError / ValueError naming ``name``."""
    if not (isinstance(ad, (tuple, list)) and len(ad) == 3):
        raise TypeError(f"{name} must be a (lora_A, lora_B, scaling) tuple, got "
                        f"{type(ad).__name__}")
    A, B, s = ad
    float_tensor(f"{name}.lora_A", A, ndim=2)
    float_tensor(f"{name}.lora_B", B, ndim=2)
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"{name}: lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} must share "
                         "the rank (lora_B (out, r), lora_A (r, in))")
    same_device(f"{name}.lora_A", A, **{f"{name}.lora_B": B})
    s = scalar(f"{name}.scaling", s)
    return A, B, s


def slot_factors(lora_A, lora_B, scaling, in_f: int, out_f: int, max_rank: int) -> float:
    """Check one adapter's factors for a pool slot: ``lora_A (r, in_f)``, ``lora_B (out_f, r)``,
    ``1 <= r <= max_rank``, a ``scaling`` finite in float32; returns the scaling as a float."""
    float_tensor("lora_A", lora_A, ndim=2)
    float_tensor("lora_B", lora_B, ndim=2)
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have at least one row (rank >= 1), got "
                         f"{tuple(lora_A.shape)}")
    shape("lora_A", lora_A, (r, in_f), "(r, in_features) of the pool")
    shape("lora_B", lora_B, (out_f, r), f"(out_features, r) with r={r} from lora_A")
    if r > max_rank:
        raise ValueError(f"lora_A has rank {r} > the pool's max_rank={max_rank}")
    return scaling32("scaling", scaling)
