"""An MTP head that agrees with its main model by construction (acceptance ~1).

Zero every residual branch of the main model (attention ``o_proj``, FFN ``down_proj``, the
experts' down projections, shared experts included) and the trunk's residual stream stays the
current token's embedding ``e``: the model predicts ``f(t) = argmax lm_head(norm(e_t))``, a
known function of the current token. Make the MTP head compute the same function of the token
it is given: ``mtp_linear_proj = [I | 0]`` (keep the normed embedding, drop the hidden state),
``mtp_emb_norm`` weight 1 (so ``norm(norm(e)) == norm(e)``), and its block's ``o_proj`` and
``down_proj`` zero. Then the draft for position i+2 is ``f(t_{i+1})`` -- exactly the target's
next token -- whatever the hidden state, the final norm or the (random) other weights are.
The final norm is set to 1 as well, so vLLM's in-tree draft, which skips that norm, agrees too.

:func:`make_agree` works on (name, tensor) pairs by name, so the same rules apply to a
checkpoint's tensors (``model.layers.3.mlp.experts.5.down_proj.weight``,
``model.mtp_linear_proj.0.weight``) and to a loaded vLLM model's parameters (``w2_weight``,
``model.mtp_linear_proj.weight``, in-tree ``model.layers.28.mtp_linear_proj.weight``): it builds
the tiny CPU test checkpoints and, through ``LLM.collective_rpc``, the full-size GPU benchmark
model after a dummy load (no 40 GB file).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_ZEROED = ("o_proj.weight", "o_proj.bias", "down_proj.weight", "down_proj.bias", "w2_weight", "w2_bias")


def make_agree(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Apply the construction in place; return how many tensors it changed."""
    changed = 0
    with torch.no_grad():
        for name, tensor in named_tensors:
            if name.endswith(_ZEROED):
                tensor.zero_()
            elif name.endswith(("mtp_emb_norm.weight", "mtp_emb_norm.0.weight")) or name in (
                "model.norm.weight",
                "norm.weight",
            ):
                tensor.fill_(1.0)
            elif "mtp_linear_proj" in name and name.endswith("weight"):
                if tensor.dim() != 2:
                    raise ValueError(
                        f"{name} has shape {list(tensor.shape)}, not [H, 2H]: repacked by the "
                        "platform (vLLM's CPU GEMMs); on CPU build the agreeing checkpoint "
                        "with make_tiny_checkpoint(..., mtp_agree=True) instead"
                    )
                rows, cols = tensor.shape
                hidden = min(rows, cols)
                tensor.zero_()
                eye = torch.eye(hidden, dtype=tensor.dtype, device=tensor.device)
                if cols == 2 * hidden:  # [H, 2H]: out = in[:H] (the embedding half)
                    tensor[:, :hidden] = eye
                else:  # stored transposed, [2H, H]
                    tensor[:hidden, :] = eye
            elif "mtp_linear_proj" in name and name.endswith("bias"):
                tensor.zero_()
            else:
                continue
            changed += 1
    return changed


def make_loaded_models_agree(worker) -> dict[str, int]:
    """``LLM.collective_rpc`` target: the construction on the loaded target and draft of one
    vLLM worker. The V1 runner keeps the draft at ``model_runner.drafter.model``, the V2 runner
    (``VLLM_USE_V2_MODEL_RUNNER=1``; the only one in vLLM 0.34) at
    ``model_runner.speculator.model``; with speculative decoding configured and no draft found
    there, it raises rather than leave a random draft that reads as an acceptance of 0."""
    runner = worker.model_runner
    counts = {"target": make_agree(runner.model.named_parameters())}
    for attribute in ("drafter", "speculator"):
        draft = getattr(getattr(runner, attribute, None), "model", None)
        if draft is not None:
            counts["draft"] = make_agree(draft.named_parameters())
            break
    else:
        if getattr(worker.vllm_config, "speculative_config", None) is not None:
            raise RuntimeError(
                f"{type(runner).__name__} has speculative decoding configured, but no draft model "
                "at .drafter.model or .speculator.model"
            )
    return counts
