"""Benchmark group ``moe_block``: a whole MoE block's experts with LoRA on both expert
parameters (gate_up and down), fwd+bwd, as a model runs it.

Inputs: a transformers 5 ``Qwen3MoeExperts`` (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H,
I)``, SiLU GLU), ``hidden (T, H)``, the router's ``top_k_index (T, k)`` (ids drawn uniformly,
distinct per token) and ``top_k_weights (T, k)``, LoRA of rank r on both parameters (scaling 2),
``dy (T, H)``; gradients to hidden and every LoRA factor (the check compares y and dhidden).

``hf_experts_lora``  transformers' eager experts loop (per hit expert: rows, gate_up, act, down,
                     weighted ``index_add_``) with an unfused LoRA term on both GEMMs
``peft``             PEFT 0.21's ``LoraConfig(target_parameters=["gate_up_proj", "down_proj"])``
                     on the same module (nested ``ParamWrapper``s: the dense ``W + s B A`` of every
                     expert per forward, then transformers' experts forward as configured)
``hf_experts_base``  the base experts module alone (no LoRA; fwd + dhidden): the floor
``ours_default``     :class:`lora_kernels.moe.LoRAExperts` (one expert plan for both GEMMs,
                     :func:`lora_kernels.moe_lora_linear`; CPU: backend torch)

``moe_block_decode``: a served decode step (T sequences x 1 token, each its own adapter among
``n``, :class:`lora_kernels.MultiAdapterModel` with ``target_parameters``) vs the base experts
module alone (the ratio is the adapters' decode overhead).

Work: per GEMM as ``bench.cases_moe.moe_counts`` with M = T k rows (gate_up: K=H, N=2I; down:
K=I, N=H). CPU rows only (a GPU run uses ``group moe``'s Triton point).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cases import dt, esize, gen, randn
from .cases_moe import moe_counts
from .harness import Case, Impl

GROUP = "moe_block"


class ExpertsHolder(nn.Module):
    """A model whose one submodule ``experts`` is the experts module (what PEFT's
    ``target_parameters`` and the server wrap): ``forward(h, idx, w) = experts(h, idx, w)``."""

    def __init__(self, ex):
        super().__init__()
        self.experts = ex

    def forward(self, h, idx, w):
        return self.experts(h, idx, w)


def block_key(T, k, E, H, inter, r, dtype) -> str:
    return f"T{T}-top{k}-E{E}-H{H}-I{inter}-r{r}-{dt(dtype)}"


def _inputs(T, k, E, H, inter, r, dtype):
    def make(device, i):
        g = gen(device, 7000 + i)
        idx = torch.stack([torch.randperm(E, generator=g, device=device)[:k] for _ in range(T)])
        w = torch.rand((T, k), generator=g, device=device).to(dtype)
        return dict(h=randn((T, H), dtype, device, g, requires_grad=True), idx=idx,
                    w=w / w.sum(1, keepdim=True), dy=randn((T, H), dtype, device, g),
                    Wgu=randn((E, 2 * inter, H), dtype, device, g, H ** -0.5),
                    Wd=randn((E, H, inter), dtype, device, g, inter ** -0.5),
                    Agu=randn((E, r, H), dtype, device, g, H ** -0.5),
                    Bgu=randn((E, 2 * inter, r), dtype, device, g, 0.1 / r ** 0.5),
                    Ad=randn((E, r, inter), dtype, device, g, inter ** -0.5),
                    Bd=randn((E, H, r), dtype, device, g, 0.1 / r ** 0.5), s=2.0)
    return make


def experts_module(d, device):
    """A transformers Qwen3MoeExperts holding the case's expert weights (frozen)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, two_i, H = d["Wgu"].shape
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=two_i // 2, num_experts=E,
                         num_experts_per_tok=d["idx"].shape[1], hidden_act="silu")
    ex = Qwen3MoeExperts(cfg).to(device=device, dtype=d["Wgu"].dtype)
    with torch.no_grad():
        ex.gate_up_proj.copy_(d["Wgu"])
        ex.down_proj.copy_(d["Wd"])
    return ex.requires_grad_(False)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _impl_hf_lora() -> Impl:
    def prepare(sets, device):
        facs = [{n: _leaf(d[n]) for n in ("Agu", "Bgu", "Ad", "Bd")} for d in sets]

        def step(i):
            d, f = sets[i], facs[i]
            h, E, s = d["h"], d["Wgu"].shape[0], d["s"]
            out = torch.zeros_like(h)
            mask = F.one_hot(d["idx"], num_classes=E).permute(2, 1, 0)
            for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
                pos, tok = torch.where(mask[e])
                xe = h[tok]
                gu = F.linear(xe, d["Wgu"][e]) + s * F.linear(F.linear(xe, f["Agu"][e]),
                                                              f["Bgu"][e])
                gate, up = gu.chunk(2, dim=-1)
                a = F.silu(gate) * up
                o = F.linear(a, d["Wd"][e]) + s * F.linear(F.linear(a, f["Ad"][e]), f["Bd"][e])
                out.index_add_(0, tok, o * d["w"][tok, pos, None])
            g = torch.autograd.grad(out, (h, *f.values()), d["dy"])
            return out, g[0]
        return step
    return Impl("hf_experts_lora", prepare, graph=False,
                note="transformers' eager experts loop + unfused LoRA on gate_up and down")


def _impl_peft() -> Impl:
    def prepare(sets, device):
        import peft

        from ..peft_moe import to_peft

        r = sets[0]["Agu"].shape[1]
        models = []
        for d in sets:
            pm = peft.get_peft_model(ExpertsHolder(experts_module(d, device)), peft.LoraConfig(
                r=r, lora_alpha=d["s"] * r, target_modules=[],
                target_parameters=["gate_up_proj", "down_proj"]))
            outer = pm.base_model.model.experts          # ParamWrapper(down(gate_up(experts)))
            with torch.no_grad():
                for w, (a, b) in ((outer, ("Ad", "Bd")), (outer.base_layer, ("Agu", "Bgu"))):
                    A2, B2 = to_peft(d[a], d[b])
                    w.lora_A["default"].weight.copy_(A2)
                    w.lora_B["default"].weight.copy_(B2)
            models.append(pm)

        def step(i):
            d, pm = sets[i], models[i]
            y = pm(d["h"], d["idx"], d["w"])
            ps = [p for p in pm.parameters() if p.requires_grad]
            return y, torch.autograd.grad(y, (d["h"], *ps), d["dy"])[0]
        return step
    return Impl("peft", prepare, graph=False,
                note="PEFT target_parameters (ParamWrapper): dense W + s B A per forward")


def _impl_base(flops, nbytes) -> Impl:
    def prepare(sets, device):
        exs = [experts_module(d, device) for d in sets]

        def step(i):
            d = sets[i]
            y = exs[i](d["h"], d["idx"], d["w"])
            return y, torch.autograd.grad(y, d["h"], d["dy"])[0]
        return step
    return Impl("hf_experts_base", prepare, flops=flops, bytes=nbytes, check=False, graph=False,
                note="the transformers experts module alone (no LoRA): fwd + dhidden")


def _impl_ours() -> Impl:
    def prepare(sets, device):
        from ..moe import ExpertFactors, LoRAExperts

        mods = []
        for d in sets:
            m = LoRAExperts(experts_module(d, device), ["gate_up_proj", "down_proj"], r=1)
            m.set_factors("gate_up_proj", ExpertFactors(d["Agu"], d["Bgu"], d["s"]))
            m.set_factors("down_proj", ExpertFactors(d["Ad"], d["Bd"], d["s"]))
            mods.append(m)

        def step(i):
            d, m = sets[i], mods[i]
            y = m(d["h"], d["idx"], d["w"])
            ps = [*m.lora_A.values(), *m.lora_B.values()]
            return y, torch.autograd.grad(y, (d["h"], *ps), d["dy"])[0]
        return step
    return Impl("ours_default", prepare, graph=False, note="lora_kernels.moe.LoRAExperts")


def block_case(T, k, E, H, inter, r, dtype, device) -> Case:
    e = esize(dtype)
    M = T * k
    gu, dn = moe_counts(M, H, 2 * inter, E, r, e), moe_counts(M, inter, H, E, r, e)
    flops, nbytes = gu[0] + dn[0], gu[1] + dn[1]
    bf = 4.0 * M * (2 * inter) * H + 4.0 * M * H * inter
    bb = nbytes - 3.0 * e * E * r * (3 * H + 3 * inter) - 16.0 * M * r
    return Case(GROUP, "moe_block_fwd_bwd", block_key(T, k, E, H, inter, r, dtype),
                dict(T=T, top_k=k, E=E, hidden=H, intermediate=inter, r=r), dtype, flops,
                nbytes, _inputs(T, k, E, H, inter, r, dtype),
                [_impl_hf_lora(), _impl_peft(), _impl_base(bf, bb), _impl_ours()],
                ref="hf_experts_lora", baseline="peft", grad=True, set_bytes=nbytes)


def moe_block_cases(device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        return []          # GPU: group moe's Triton point; this block runs the torch path
    f32 = torch.float32
    shapes = [(128, 2, 8, 256, 96, 8)]
    if not quick:
        shapes += [(512, 4, 16, 256, 128, 16)]
    return ([block_case(*s, f32, device) for s in shapes]
            + [decode_case(16, 2, 8, 256, 96, 8, f32, device, n_adapters=4)])


def _decode_inputs(T, k, E, H, inter, r, n_adapters, dtype):
    base = _inputs(T, k, E, H, inter, r, dtype)

    def make(device, i):
        d = base(device, i)
        d["h"] = d["h"].detach()
        g = gen(device, 7500 + i)
        d["adapters"] = [{p: (randn((E, r, K), dtype, device, g, K ** -0.5),
                              randn((E, N, r), dtype, device, g, 0.1 / r ** 0.5), 2.0)
                          for p, K, N in (("gate_up_proj", H, 2 * inter),
                                          ("down_proj", inter, H))}
                         for _ in range(n_adapters)]
        d["names"] = [f"a{j % n_adapters}" for j in range(T)]
        return d
    return make


def _impl_served() -> Impl:
    def prepare(sets, device):
        from ..moe import ExpertFactors
        from ..serving import MultiAdapterModel

        servers = []
        for d in sets:
            n = len(d["adapters"])
            srv = MultiAdapterModel(ExpertsHolder(experts_module(d, device)), None, max_adapters=n,
                                    max_rank=d["Agu"].shape[1],
                                    target_parameters=["gate_up_proj", "down_proj"])
            for j, ad in enumerate(d["adapters"]):
                srv.add(f"a{j}", {f"experts.{p}": ExpertFactors(*f) for p, f in ad.items()})
            servers.append(srv)

        def step(i):
            d, srv = sets[i], servers[i]
            with torch.no_grad(), srv.using(d["names"]):
                return srv.model(d["h"], d["idx"], d["w"])
        return step
    return Impl("ours_served", prepare, graph=False,
                note="MultiAdapterModel(target_parameters=...): each token its own adapter")


def _impl_base_decode() -> Impl:
    def prepare(sets, device):
        exs = [experts_module(d, device) for d in sets]

        def step(i):
            d = sets[i]
            with torch.no_grad():
                return exs[i](d["h"], d["idx"], d["w"])
        return step
    return Impl("hf_experts_base", prepare, check=False, graph=False,
                note="the transformers experts module alone (no adapter)")


def decode_case(T, k, E, H, inter, r, dtype, device, *, n_adapters: int) -> Case:
    """Served decode step of one MoE block: T sequences x 1 token, ``n_adapters`` distinct
    adapters (LoRA on gate_up and down), vs the base experts alone."""
    e = esize(dtype)
    M = T * k
    flops = 2.0 * M * (2 * inter) * H + 2.0 * M * H * inter
    nbytes = e * (2.0 * E * 3 * inter * H + 2.0 * T * H)
    return Case(GROUP, "moe_block_decode",
                block_key(T, k, E, H, inter, r, dtype) + f"-{n_adapters}ad-decode",
                dict(T=T, top_k=k, E=E, hidden=H, intermediate=inter, r=r, adapters=n_adapters),
                dtype, flops, nbytes, _decode_inputs(T, k, E, H, inter, r, n_adapters, dtype),
                [_impl_base_decode(), _impl_served()], ref=None, baseline="hf_experts_base")
