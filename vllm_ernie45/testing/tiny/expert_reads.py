"""How many routed experts a verification step reads: HF transformers' ERNIE MoE model on a
token sequence, the experts its router selects for every token, counted per layer over each
window of ``k + 1`` consecutive tokens (what one speculative step with ``k`` drafts verifies
at batch 1). A step over one repeated token reads ``top_k`` experts per layer; over tokens
that change, up to ``(k + 1) * top_k``."""

from __future__ import annotations

from pathlib import Path


def selected_experts(model_dir: str | Path, sequence: list[int]) -> dict[int, list[set[int]]]:
    """layer index -> for each token of ``sequence``, the set of experts its router chose."""
    import torch
    from transformers import Ernie4_5_MoeForCausalLM

    model = Ernie4_5_MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chosen: dict[int, list[set[int]]] = {}

    def hook(index: int):
        def record(_module, _args, output):
            chosen[index] = [set(row.tolist()) for row in output[2]]  # (logits, weights, experts)

        return record

    for index, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "moe_statics"):
            gate.register_forward_hook(hook(index))
    with torch.no_grad():
        model(input_ids=torch.tensor([sequence]))
    return chosen


def experts_per_step(model_dir: str | Path, sequence: list[int], window: int) -> dict[int, list[int]]:
    """layer index -> distinct experts read by each window of ``window`` consecutive tokens."""
    return {
        layer: [len(set().union(*per_token[i : i + window])) for i in range(len(per_token) - window + 1)]
        for layer, per_token in selected_experts(model_dir, sequence).items()
    }
