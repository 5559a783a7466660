"""lora_kernels: fused Triton and CUDA kernels for low-rank adapters.

Importing this package makes no GPU query and needs no compiled code; the CUDA module
``lora_kernels._C`` is loaded on first use (see :func:`cuda_available`).
"""

from ._backend import BACKENDS, cuda_available, resolve_backend, triton_available
from .compose import lora_cosine, rms_cosine, sum_adapters, sum_loras
from .inject import inject, inject_adapter, merge_and_unload
from .layers import METHODS, AdapterLinear, LoRALinear
from .layers.cur import CURLoRALinear
from .layers.deep import DeepLoRALinear
from .layers.dora import DoRALinear
from .layers.embedding import LoRAEmbedding
from .layers.glora import GLoRALinear
from .layers.nora import NoRALinear
from .ops.cur import cur_linear
from .ops.deep import deep_lora_linear
from .ops.dora import dora_linear
from .ops.embedding import lora_embedding, multi_lora_embedding
from .ops.glora import glora_linear
from .ops.lora import lora_linear
from .ops.moe_lora import ExpertPlan, expert_plan, moe_lora_linear
from .ops.multi_lora import multi_lora_add_, multi_lora_linear
from .ops.nora import nora_linear
from .params import count_trainable, param_table, print_param_table, trainable_params
from .peft_io import load_peft_adapter, save_peft_adapter
from .peft_patch import patch_peft, unpatch_peft
from .quant import FP8Weight, Int8Weight, NF4Weight  # lora_kernels.quant: quantized bases
from .serving import AdapterPool, MultiAdapterModel

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "METHODS", "AdapterLinear", "AdapterPool", "CURLoRALinear", "DeepLoRALinear",
    "DoRALinear", "ExpertPlan", "FP8Weight", "GLoRALinear", "Int8Weight", "LoRAEmbedding",
    "LoRALinear", "MultiAdapterModel", "NF4Weight", "NoRALinear", "count_trainable",
    "cuda_available", "cur_linear", "deep_lora_linear", "dora_linear", "expert_plan",
    "glora_linear", "inject", "inject_adapter", "load_peft_adapter", "lora_cosine",
    "lora_embedding", "lora_linear", "merge_and_unload", "moe_lora_linear", "multi_lora_add_",
    "multi_lora_embedding", "multi_lora_linear", "nora_linear", "param_table", "patch_peft",
    "print_param_table", "resolve_backend", "rms_cosine", "save_peft_adapter", "sum_adapters",
    "sum_loras", "trainable_params", "triton_available", "unpatch_peft",
]
