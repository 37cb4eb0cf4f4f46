"""ERNIE 4.5's multi-token-prediction (MTP) head as vLLM's draft model (``method="mtp"``).

Registered by ``vllm_ernie45.register()`` under ``ErnieMTPModel``, the architecture vLLM
gives the draft of an ``ernie4_5_moe`` target when ``speculative_config`` says ``"mtp"`` (or
the older alias ``"ernie_mtp"``); vLLM builds it in the target's tensor-parallel group and
hands it the embedding and LM head of the target (no copies).

What the block computes, as the weights were trained (PaddleFormers
``transformers/ernie4_5_moe/modeling.py`` and PaddlePaddle/ERNIE ``ernie/modeling_moe.py``,
``ErnieModel.forward``: ``mtp_outputs.append(hidden_states)`` *before* ``self.norm``, the
``mtp_block`` fed that state, then ``mtp_outputs = [self.norm(h) for h in mtp_outputs]``
before the shared LM head)::

    x  = mtp_linear_proj(concat(mtp_emb_norm(embed(next token)), mtp_hidden_norm(h)))
    y  = mtp_block(x)                       # an ERNIE decoder layer, dense FFN, GPT-J RoPE
    logits = lm_head(norm(y))               # the model's own final norm, then the shared head

* ``h`` is the target's last decoder layer output **before** its final norm (the residual
  stream), handed over by the target's ``get_mtp_target_hidden_states``
  (:meth:`vllm_ernie45.model.ErnieMoeForCausalLM.get_mtp_target_hidden_states`).
  ``VLLM_ERNIE45_MTP_HIDDEN=post_norm`` feeds the normed output instead, as FastDeploy and
  vLLM's in-tree ``ErnieMTP`` do.
* The embedding of position 0 is not zeroed (the training code shifts the inputs by one).
* RoPE is ERNIE's interleaved style (vLLM's in-tree ``ErnieMTP`` builds a Llama layer, NeoX
  style), and ``use_bias`` applies as in the trunk.
* k > 1 (``num_speculative_tokens``): vLLM applies this one block autoregressively, feeding
  its output ``y`` back as the next step's ``h`` (pre-norm, like the training code's depth
  d+1) and the token it drafted as the next embedding.

The block is compiled with vLLM's ``torch.compile`` support (so vLLM captures it in CUDA
graphs); the final norm and the LM head run in :meth:`ErnieMTPDraft.compute_logits`, since
vLLM's V1 proposer takes one tensor back from an ERNIE draft's ``forward``.
"""

# No `from __future__ import annotations`: support_torch_compile reads forward()'s
# annotations as types to find the dynamic dimensions.
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.utils import maybe_prefix

from vllm_ernie45.config import ErnieArch, arch_from_config, rope_parameters_for
from vllm_ernie45.config_from_tensors import resolve_hf_config
from vllm_ernie45.in_tree import InTreeWhereNeeded
from vllm_ernie45.layers import ErnieDecoderLayer
from vllm_ernie45.loader import load_mtp_checkpoint

MTP_ARCHITECTURE = "ErnieMTPModel"  # what vLLM names the draft of an ernie4_5_moe target


class SharedFromTarget(nn.Module):
    """Stands where vLLM puts the target's embedding / LM head after loading the draft;
    holds no weights, so none are loaded or allocated for it."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        # vLLM 0.26 reads the draft embedding's `.weight` before sharing (a width check it
        # skips for a non-tensor).
        self.weight = None

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            f"vllm-ernie45: the MTP draft's {self.what} was not shared from the target model "
            "(vLLM shares it after loading the draft)"
        )


def draft_arch(vllm_config: VllmConfig) -> tuple[ErnieArch, object]:
    """The draft's ``ErnieArch`` and HF config (vLLM's ``ernie_mtp`` rewrite of the
    target's config: the same keys plus ``n_predict``), with a clear error where the
    checkpoint's config declares no MTP head."""
    spec = vllm_config.speculative_config
    model_config = spec.draft_model_config if spec is not None else vllm_config.model_config
    config = resolve_hf_config(model_config, vllm_config.load_config.load_format)
    arch = arch_from_config(config)
    if arch.num_mtp_layers < 1:
        raise ValueError(
            "speculative decoding with method 'mtp' needs ERNIE 4.5's MTP head, but the "
            "checkpoint's config.json has no 'num_nextn_predict_layers' >= 1"
        )
    return arch, config


@support_torch_compile
class ErnieMTPBlock(nn.Module):
    """Norms, projection and decoder layer of the MTP head (compiled by vLLM)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        arch, config = draft_arch(vllm_config)
        H = arch.hidden_size
        self.embed_tokens = SharedFromTarget("embed_tokens")
        self.mtp_emb_norm = RMSNorm(H, eps=arch.rms_norm_eps)
        self.mtp_hidden_norm = RMSNorm(H, eps=arch.rms_norm_eps)
        self.mtp_linear_proj = ReplicatedLinear(
            2 * H, H, bias=arch.use_bias, prefix=f"{prefix}.mtp_linear_proj"
        )
        # Named as layer `num_hidden_layers` of the model, after the target's layers, so its
        # attention (and KV cache) has a name of its own.
        self.mtp_block = ErnieDecoderLayer(
            arch,
            arch.num_layers,
            rope_parameters_for(arch, config),
            vllm_config.cache_config,
            vllm_config.quant_config,
            enable_eplb=False,
            prefix=f"{prefix}.layers.{arch.num_layers}",
            dense=True,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        x = torch.cat([self.mtp_emb_norm(inputs_embeds), self.mtp_hidden_norm(hidden_states)], dim=-1)
        x, _ = self.mtp_linear_proj(x)
        out, residual = self.mtp_block(positions, x, None)
        return out + residual  # the block's output before any norm: fed back for k > 1


class ErnieMTPDraft(InTreeWhereNeeded, nn.Module):
    """vLLM's draft model for ERNIE 4.5 MTP (``ErnieMTPModel``); vLLM's in-tree ``ErnieMTP``
    where the engine's target steps aside (bitsandbytes: ``vllm_ernie45.in_tree``)."""

    in_tree_architecture = MTP_ARCHITECTURE

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if get_pp_group().world_size > 1:
            raise ValueError(
                "vllm-ernie45: MTP speculative decoding with pipeline parallelism is not "
                "supported (the draft would need the first stage's embedding); use tensor "
                "parallelism"
            )
        self.arch, self.config = draft_arch(vllm_config)
        self.model = ErnieMTPBlock(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.norm = RMSNorm(self.arch.hidden_size, eps=self.arch.rms_norm_eps)
        self.lm_head = SharedFromTarget("lm_head")
        self.logits_processor = LogitsProcessor(self.arch.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        intermediate_tensors: object = None,
        inputs_embeds: torch.Tensor | None = None,
        spec_step_idx: int = 0,
    ) -> torch.Tensor:
        # One MTP block: every draft step applies it (vLLM passes spec_step_idx 0 here).
        return self.model(input_ids, positions, hidden_states, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor | None:
        return self.logits_processor(
            self.lm_head, self.norm(hidden_states), embedding_bias=getattr(self.lm_head, "bias", None)
        )

    def is_unused_checkpoint_weight(self, name: str) -> bool:
        """vLLM >= 0.32 skips reading checkpoint shards that hold only unused tensors."""
        return not (name.startswith("model.mtp_") or name == "model.norm.weight")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_mtp_checkpoint(self, self.arch, weights)

