"""ERNIE 4.5 decoder building blocks on vLLM's parallel layers.

A ladder of small modules: :class:`ErnieMLP` (dense FFN and shared experts),
:class:`ErnieAttention`, :class:`ErnieMoE` (fp32 router + fused routed experts + shared
experts), :class:`ErnieDecoderLayer`. Parameter names match the targets in
``vllm_ernie45.checkpoint``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.config import CacheConfig, get_current_vllm_config
from vllm.distributed import (
    get_ep_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.platforms import current_platform

from vllm_ernie45 import compat, envs
from vllm_ernie45.config import ErnieArch
from vllm_ernie45.expert_layout import FusedExpertLayout
from vllm_ernie45.quantized import checkpoint_is_quantized
from vllm_ernie45.routing import make_routing_function

logger = init_logger(__name__)


class ErnieMLP(nn.Module):
    """SwiGLU FFN: ``down(silu(gate(x)) * up(x))``, gate and up fused into one GEMM."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        bias: bool,
        quant_config: QuantizationConfig | None,
        reduce_results: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size,
            [intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        # Unreduced (shared-expert) output: vLLM refuses a bias inside the layer, since every
        # tensor-parallel rank would add it before the all-reduce. It is added here on rank 0.
        skip_bias_add = bias and not reduce_results
        self.add_skipped_bias = skip_bias_add and get_tensor_model_parallel_rank() == 0
        self.down_proj = RowParallelLinear(
            intermediate_size,
            hidden_size,
            bias=bias,
            skip_bias_add=skip_bias_add,
            quant_config=quant_config,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, skipped_bias = self.down_proj(self.act_fn(gate_up))
        if self.add_skipped_bias:
            out = out + skipped_bias
        return out


class ErnieAttention(nn.Module):
    """GQA self-attention with ERNIE's interleaved (GPT-J style, not NeoX) rotary embedding."""

    def __init__(
        self,
        arch: ErnieArch,
        rope_parameters: dict[str, Any],
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
        quantize_linears: bool = True,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if arch.num_heads % tp_size:
            raise ValueError(
                f"num_attention_heads={arch.num_heads} is not divisible by "
                f"tensor_parallel_size={tp_size}"
            )
        if arch.num_kv_heads % tp_size and tp_size % arch.num_kv_heads:
            raise ValueError(
                f"num_key_value_heads={arch.num_kv_heads} and tensor_parallel_size={tp_size} "
                "must divide one another"
            )
        self.num_heads = arch.num_heads // tp_size
        self.num_kv_heads = max(1, arch.num_kv_heads // tp_size)
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        linear_quant_config = quant_config if quantize_linears else None

        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size,
            arch.head_dim,
            arch.num_heads,
            arch.num_kv_heads,
            bias=arch.use_bias,
            quant_config=linear_quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            arch.q_size,
            arch.hidden_size,
            bias=arch.use_bias,
            quant_config=linear_quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            arch.head_dim,
            max_position=arch.max_position_embeddings,
            is_neox_style=False,
            rope_parameters=rope_parameters,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class ErnieMoE(nn.Module):
    """Routed experts (vLLM fused MoE) plus optional shared experts, one all-reduce.

    The router runs in fp32 (gate weight and input), selects experts on the bias-corrected
    probabilities and weights them by the unbiased ones (``vllm_ernie45.routing``).

    Shared experts either run as their own MLP beside the fused-MoE call, or -- where
    ``fused_layout`` is set -- inside it, as ``S`` pseudo-experts (one per
    ``moe_intermediate_size`` slice of the shared FFN, SwiGLU being separable along that
    dimension) that every token selects with weight 1, in the slots ``fused_layout`` gives
    them (under expert parallelism one slice per rank; ``vllm_ernie45.expert_layout``).
    """

    def __init__(
        self,
        arch: ErnieArch,
        quant_config: QuantizationConfig | None,
        enable_eplb: bool,
        prefix: str,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if tp_size > arch.num_experts:
            raise ValueError(
                f"tensor_parallel_size={tp_size} is larger than moe_num_experts={arch.num_experts}"
            )
        vllm_config = get_current_vllm_config()
        parallel_config = vllm_config.parallel_config
        is_cuda = current_platform.is_cuda()
        expert_parallel = bool(getattr(parallel_config, "enable_expert_parallel", False))
        ep_size = get_ep_group().world_size if expert_parallel else 1
        fuse = envs.fuse_shared_experts(is_cuda, ep_size > 1)
        refused = shared_fusion_refused(vllm_config)
        if fuse and refused and arch.num_shared_experts:
            logger.info_once("Shared experts run beside the fused-MoE call: %s.", refused)
        self.fused_layout = fused_shared_layout(arch, ep_size, enable_eplb, fuse and refused is None)
        num_fused = arch.num_shared_experts if self.fused_shared else 0

        self.n_routed_experts = arch.num_experts
        self.n_shared_experts = arch.num_shared_experts
        self.n_logical_experts = arch.num_experts + num_fused
        self.n_redundant_experts = parallel_config.eplb_config.num_redundant_experts
        self.n_physical_experts = self.n_logical_experts + self.n_redundant_experts
        self.n_local_physical_experts = self.n_physical_experts // get_ep_group().world_size

        self.gate = compat.gate_linear_cls()(
            arch.hidden_size,
            arch.num_experts,
            bias=False,
            out_dtype=torch.float32,
            params_dtype=torch.float32,
            prefix=f"{prefix}.gate",
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.empty(arch.num_experts, dtype=torch.float32), requires_grad=False
        )
        # Issue 29: fused shared experts beside the routed call in steps above a token count
        # (vllm_ernie45.shared_beside); registered before the fused-MoE layer (its weight hook
        # must run before vLLM processes the experts' weights).
        self.shared_beside = None
        beside_above = envs.shared_beside_above()
        if beside_above is not None and self.fused_shared:
            alone = tp_size == 1 and ep_size == 1 and parallel_config.data_parallel_size == 1
            if alone and quant_config is None:
                from vllm_ernie45.shared_beside import SharedBeside

                self.shared_beside = SharedBeside(self.fused_layout, arch.moe_intermediate_size, beside_above)
            else:
                logger.warning_once(
                    "VLLM_ERNIE45_SHARED_BESIDE_ABOVE ignored: one GPU with unquantized experts only "
                    "(tensor parallel %d, expert parallel %d, data parallel %d, quantization %s).",
                    tp_size, ep_size, parallel_config.data_parallel_size, quant_config,
                )
        self.shared_experts: ErnieMLP | None = None
        if arch.num_shared_experts and not self.fused_shared:
            self.shared_experts = ErnieMLP(
                arch.hidden_size,
                arch.shared_intermediate_size,
                bias=arch.use_bias,
                quant_config=quant_config,
                reduce_results=False,  # summed with the routed output, then reduced once
                prefix=f"{prefix}.shared_experts",
            )
        self.experts = compat.fused_moe_factory()(
            num_experts=arch.num_experts + num_fused,
            top_k=arch.top_k + num_fused,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.moe_intermediate_size,
            renormalize=True,
            quant_config=quant_config,
            prefix=f"{prefix}.experts",
            custom_routing_function=make_routing_function(
                self.e_score_correction_bias,
                arch.moe_norm_min,
                backend=envs.router_backend(is_cuda),
                layout=self.fused_layout,
                beside=self.shared_beside,
            ),
            enable_eplb=enable_eplb,
            num_redundant_experts=self.n_redundant_experts,
            shared_experts=self.shared_experts,
            router_logits_dtype=torch.float32,
        )
        compat.fit_cpu_experts(self.experts)
        if self.shared_beside is not None:
            self.shared_beside.attach(self.experts)
            if not beside_choice_stays_per_step(vllm_config, self.experts):
                self.shared_beside.above = None  # inert: the router keeps the shared slots
                logger.warning_once(
                    "VLLM_ERNIE45_SHARED_BESIDE_ABOVE ignored: on this platform vLLM's fused-MoE call "
                    "is traced by torch.compile, which would fix the per-step choice at compile time "
                    "(it applies on CUDA, or with enforce_eager)."
                )
        # Issue 29: the fused-MoE kernels of the eager (prefill / mixed) steps compiled at
        # start-up rather than inside the first requests that meet them (vllm_ernie45.moe_warmup).
        if is_cuda and ep_size == 1 and not enable_eplb and envs.moe_warmup():
            from vllm_ernie45.moe_warmup import KernelWarmup, eager_token_range

            low, high = eager_token_range(vllm_config)
            top_k = arch.top_k + num_fused
            if self.shared_beside is not None:  # steps it takes launch the routed slots only
                beside = self.shared_beside

                def top_k(tokens: int, inside: int = top_k, routed: int = arch.top_k) -> int:
                    return routed if beside.takes(tokens) else inside

            self.kernel_warmup = KernelWarmup(self.experts, top_k, low, high, num_router_logits=arch.num_experts)

    @property
    def fused_shared(self) -> bool:
        return self.fused_layout is not None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, shape[-1])
        router_logits, _ = self.gate(hidden_states.float())
        beside = self.shared_beside
        if beside is not None and beside.above is None:  # fixed once the weights are loaded
            beside = None
        shared = beside.shared_output(hidden_states) if beside is not None else None
        out = self.experts(hidden_states=hidden_states, router_logits=router_logits)
        if beside is not None:
            beside.add_to(out, shared)
        return out.view(shape)


def beside_choice_stays_per_step(vllm_config: Any, experts: nn.Module) -> bool:
    """Whether the router's per-step choice (``vllm_ernie45.shared_beside``) is made at run time:
    the engine runs eagerly, or vLLM's fused-MoE call is an op torch.compile does not trace
    (CUDA). Traced (CPU / TPU compiled), one branch would be fixed in the compiled graph."""
    return bool(vllm_config.model_config.enforce_eager) or compat.fused_moe_call_is_opaque(experts)


def shared_fusion_refused(vllm_config: Any) -> str | None:
    """Why this engine's shared experts must run as their own MLP whatever
    ``VLLM_ERNIE45_FUSE_SHARED_EXPERTS`` says (None: they may be fused):

    * a pre-quantized checkpoint: they run quantized as it stores them (fusing them would
      slice packed weights and scales);
    * LoRA: vLLM wraps shared experts as linear layers of their own (``mlp.shared_experts``)
      and packs expert adapters for one slot per routed expert (vLLM 0.26
      ``lora/lora_weights.py:177-189``); fused, a shared-expert adapter would be dropped without
      an error and an expert adapter would fail on the shared slots (issue 34,
      ``scripts/gpu/lora_check.py``) -- in-tree's layout serves both."""
    if checkpoint_is_quantized(getattr(vllm_config.model_config, "hf_config", None)):
        return "the checkpoint is pre-quantized"
    if getattr(vllm_config, "lora_config", None) is not None:
        return "LoRA is enabled (vLLM's LoRA layers wrap shared experts on their own)"
    return None


def fused_shared_layout(
    arch: ErnieArch, ep_size: int, enable_eplb: bool, wanted: bool
) -> FusedExpertLayout | None:
    """Where the shared experts sit inside the fused-MoE call, or None where they run as
    their own MLP: not wanted (``VLLM_ERNIE45_FUSE_SHARED_EXPERTS``), none, biased (the fused
    experts have no bias), with EPLB (it would count them as routed), or an expert-parallel
    size that cannot give every rank the same share of them."""
    if not wanted or not arch.num_shared_experts or arch.use_bias or enable_eplb:
        return None
    try:
        return FusedExpertLayout(arch.num_experts, arch.num_shared_experts, ep_size)
    except ValueError as reason:  # expert_layout.unfusable_reason
        logger.info_once("Shared experts run beside the fused-MoE call: %s.", reason)
        return None


class ErnieDecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ErnieArch,
        layer_idx: int,
        rope_parameters: dict[str, Any],
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        enable_eplb: bool,
        prefix: str,
        dense: bool = False,
    ) -> None:
        super().__init__()
        # VLLM_ERNIE45_QUANT_SCOPE=experts: online quantization of the routed experts only.
        quantize_linears = envs.quant_scope() == "all"
        self.self_attn = ErnieAttention(
            arch, rope_parameters, cache_config, quant_config, prefix=f"{prefix}.self_attn",
            quantize_linears=quantize_linears,
        )
        self.mlp: ErnieMoE | ErnieMLP
        if arch.is_moe_layer(layer_idx) and not dense:
            self.mlp = ErnieMoE(arch, quant_config, enable_eplb, prefix=f"{prefix}.mlp")
        else:
            self.mlp = ErnieMLP(
                arch.hidden_size,
                arch.intermediate_size,
                bias=arch.use_bias,
                quant_config=quant_config if quantize_linears else None,
                prefix=f"{prefix}.mlp",
            )
        self.input_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual
