"""Expert parallelism for MoE-LoRA on torch.distributed: experts sharded over the ranks of a
process group, rows dispatched to their expert's rank and combined back with all-to-all.

Partition: E experts over W ranks in contiguous blocks, rank k owning experts
``[start_k, start_{k+1})`` with ``start_k = k*E // W`` (sizes differ by at most one; E >= W).
Each rank holds only its experts' weights and adapters (``ep.shard(t)`` cuts an ``(E, ...)``
tensor or a :class:`~lora_kernels.quant.QuantizedExperts` to them).

One expert GEMM (:func:`ep_moe_lora_linear`) or a whole MoE block (``dispatch`` once, any number
of expert GEMMs on the received rows with one :func:`~lora_kernels.expert_plan`, ``combine``
once)::

    ep = ExpertParallel(group, num_experts=E)
    d = ep.dispatch(x, expert_ids)               # rows to their expert's rank (autograd: x)
    plan = lora_kernels.expert_plan(d.expert_ids, ep.num_local)   # local ids, sorted once
    h = lora_kernels.moe_lora_linear(d.x, ep.shard(W1), None, ep.shard(A1), ep.shard(B1), plan)
    ... activation ...
    y = ep.combine(lora_kernels.moe_lora_linear(h, ep.shard(W2), ...), d)   # (M, out), -1 rows 0

Dispatch (rank-local rows ``x (M, in)``, global ``expert_ids (M,)``):
    dest[m] = owner(expert_ids[m]) (W for a skipped -1 row: never sent)
    rows    = stable argsort(dest)[:n_send]        rows grouped by destination rank
    counts  -> all_to_all_single (W ints)          how many rows each rank receives from each
    x[rows] -> all_to_all_single                   (n_recv, in), grouped by source rank
    local expert ids (expert_ids - start_owner) -> all_to_all_single
Combine (``y_recv (n_recv, out)``): the reverse all_to_all_single, then the rows scattered back to
their positions (skipped rows 0). Both collectives carry autograd
(``torch.distributed.nn.functional.all_to_all_single``: the backward is the reverse exchange), so
``dx`` and each rank's expert-adapter gradients equal those of the single-process op on all
ranks' rows (up to the summation order inside each expert GEMM). Expert weights and adapters are
sharded, not replicated: their gradients need no all-reduce.

Checks: the expert ids of every rank are bounds-checked before any exchange, and one all-reduce
of the verdict makes *every* rank raise the ``ValueError`` (naming the rank and row), never a
hang. The constructor checks that all ranks agree on E (one ``all_gather_object``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single as _a2a_autograd

from . import _validate as V
from .ops.moe_lora import check_expert_ids, moe_lora_linear
from .quant.experts import QuantizedExperts


class Dispatched(NamedTuple):
    """The rows a rank received (:meth:`ExpertParallel.dispatch`) and how to send them back.

    ``x (n_recv, in)`` (grouped by source rank); ``expert_ids (n_recv,)`` int64 *local* expert
    ids in ``[0, num_local)``; ``rows (n_send,)`` the positions of the sent rows in the
    caller's ``x``; ``send_splits`` / ``recv_splits`` per-rank row counts; ``num_rows`` M;
    ``aux (n_recv,)`` int64: the ``aux`` ids sent along with the rows (e.g. each row's adapter,
    for ``moe_lora_linear(..., lora_ids=adapter * num_local + expert_ids)``), or None.
    """

    x: torch.Tensor
    expert_ids: torch.Tensor
    rows: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    num_rows: int
    aux: torch.Tensor | None = None


class ExpertParallel:
    """Experts ``[0, num_experts)`` sharded over ``group``'s ranks (see the module doc)."""

    def __init__(self, group, num_experts: int):
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts < self.world:
            raise ValueError(f"num_experts={num_experts} must be >= the group size {self.world} "
                             f"(every rank owns at least one expert)")
        seen = [None] * self.world
        dist.all_gather_object(seen, num_experts, group=group)
        if len(set(seen)) != 1:
            raise ValueError(f"ranks disagree on num_experts: {seen}")
        self.num_experts = num_experts
        self.starts = [k * num_experts // self.world for k in range(self.world + 1)]
        self.start, self.stop = self.starts[self.rank], self.starts[self.rank + 1]

    @property
    def num_local(self) -> int:
        """Number of experts this rank owns."""
        return self.stop - self.start

    def owner(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """The rank owning each (valid) expert id."""
        bounds = torch.tensor(self.starts[1:-1], dtype=torch.int64, device=expert_ids.device)
        return torch.bucketize(expert_ids.long(), bounds, right=True)

    def shard(self, t):
        """This rank's experts of an ``(E, ...)`` tensor (a view) or a QuantizedExperts."""
        if isinstance(t, QuantizedExperts):
            return t.narrow(self.start, self.num_local)
        if not isinstance(t, torch.Tensor) or t.dim() < 1 or t.shape[0] != self.num_experts:
            raise ValueError(f"shard expects an (E={self.num_experts}, ...) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        return t[self.start:self.stop]

    # ------------------------------------------------------------------------------ checks
    def check_ids(self, expert_ids: torch.Tensor) -> None:
        """Bounds-check every rank's ids; all ranks raise together (one all-reduce)."""
        err = None
        try:
            check_expert_ids("expert_ids", expert_ids, self.num_experts)
        except ValueError as e:
            err = str(e)
        flag = torch.tensor([self.rank if err else -1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        bad = int(flag[0])
        if bad >= 0:
            raise ValueError(f"on rank {self.rank}: {err}" if err else
                             f"rank {bad} has expert ids outside [-1, {self.num_experts}) "
                             f"(nothing was exchanged)")

    # ------------------------------------------------------------------------------ exchange
    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, *,
                 aux: torch.Tensor | None = None) -> Dispatched:
        """Send each row of ``x (M, in)`` to the rank owning ``expert_ids[m]`` (global ids;
        ``-1`` rows are not sent), with ``aux[m]`` ((M,) int ids, optional) along. Differentiable
        in x."""
        V.tensor("x", x, ndim=2)
        if not isinstance(expert_ids, torch.Tensor) or expert_ids.dtype not in (torch.int32,
                                                                                  torch.int64):
            raise TypeError("expert_ids must be an int32/int64 tensor")
        if expert_ids.shape != (x.shape[0],):
            raise ValueError(f"expert_ids must have shape ({x.shape[0]},) (one id per row of x),"
                             f" got {tuple(expert_ids.shape)}")
        if aux is not None and (not isinstance(aux, torch.Tensor) or aux.dtype not in (
                torch.int32, torch.int64) or aux.shape != expert_ids.shape):
            raise ValueError(f"aux must be None or an int32/int64 tensor of shape "
                             f"{tuple(expert_ids.shape)} (one id per row of x)")
        self.check_ids(expert_ids)
        W = self.world
        ids = expert_ids.long()
        dest = torch.where(ids >= 0, self.owner(ids), W)
        order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=W + 1)[:W]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send_splits, recv_splits = send.tolist(), recv.tolist()
        rows = order[:sum(send_splits)]
        starts = torch.tensor(self.starts, dtype=torch.int64, device=ids.device)
        local_send = (ids[rows] - starts[dest[rows]]).contiguous()
        n_recv = sum(recv_splits)
        ids_recv = torch.empty(n_recv, dtype=torch.int64, device=ids.device)
        dist.all_to_all_single(ids_recv, local_send, recv_splits, send_splits, group=self.group)
        aux_recv = None
        if aux is not None:
            aux_recv = torch.empty(n_recv, dtype=torch.int64, device=ids.device)
            dist.all_to_all_single(aux_recv, aux.long()[rows].contiguous(), recv_splits,
                                   send_splits, group=self.group)
        x_send = x.index_select(0, rows).contiguous()
        x_recv = _a2a_autograd(x.new_empty((n_recv, x.shape[1])), x_send, recv_splits,
                               send_splits, group=self.group)
        return Dispatched(x_recv, ids_recv, rows, send_splits, recv_splits, x.shape[0],
                          aux_recv)

    def combine(self, y: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """Send the rows ``y (n_recv, out)`` computed for ``d`` back: ``(M, out)`` in the
        dispatching rank's row order, skipped rows 0. Differentiable in y."""
        V.tensor("y", y, ndim=2)
        if y.shape[0] != len(d.expert_ids):
            raise ValueError(f"y must have {len(d.expert_ids)} rows (one per received row), got "
                             f"{tuple(y.shape)}")
        back = _a2a_autograd(y.new_empty((len(d.rows), y.shape[1])), y.contiguous(),
                             d.send_splits, d.recv_splits, group=self.group)
        out = y.new_zeros((d.num_rows, y.shape[1]))
        return out.index_copy(0, d.rows, back)


def ep_moe_lora_linear(ep: ExpertParallel, x, weight, bias, lora_A, lora_B, expert_ids,
                       scaling=1.0, *, backend=None):
    """:func:`~lora_kernels.moe_lora_linear` with the experts sharded over ``ep``'s ranks.

    ``x (M, in)`` this rank's rows, ``expert_ids (M,)`` global ids (``-1``: skipped); ``weight``
    ``(E_local, out, in)`` (or QuantizedExperts), ``bias (E_local, out) | None``, ``lora_A
    (E_local, r, in)``, ``lora_B (E_local, out, r)``: this rank's experts (``ep.shard``).
    Returns ``(M, out)``: equal to the single-process op on all ranks' rows with all experts.
    """
    if getattr(weight, "shape", (None,))[0] != ep.num_local:
        raise ValueError(f"weight must hold this rank's {ep.num_local} experts (ep.shard(W)), "
                         f"got shape {tuple(getattr(weight, 'shape', ()))}")
    d = ep.dispatch(x, expert_ids)
    y = moe_lora_linear(d.x, weight, bias, lora_A, lora_B, d.expert_ids, scaling,
                        backend=backend)
    return ep.combine(y, d)
