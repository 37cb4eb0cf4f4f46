"""PEFT LoRA adapters for the tiny checkpoints, made by PEFT itself.

``make_lora_adapter(model_dir, out_dir, targets, rank, seed)`` wraps HF transformers' model of
``model_dir`` with ``peft.LoraConfig(target_modules=targets)``, gives every LoRA matrix a random
value (PEFT initialises ``lora_B`` to zeros, an adapter that changes nothing) at a scale that
moves the tiny model's greedy tokens, and saves it with ``save_pretrained``: the
``adapter_config.json`` + ``adapter_model.safetensors`` a user's fine-tune has.

On the MoE model (transformers 5, PEFT 0.21) two more things matter (issue 34):

* The routed experts are 3D parameters (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
  ``mlp.experts.down_proj`` ``[E, H, I]``), not ``nn.Linear`` modules: PEFT adapts them through
  ``target_parameters`` and saves the "3D" layout (``mlp.experts.base_layer.lora_A/B`` = gate/up,
  ``mlp.experts.lora_A/B`` = down; ``lora_A`` ``[r*E, in]``, ``lora_B`` ``[out, r*E]``).
* PEFT's transformers-v4-to-v5 config conversion (``peft.utils.transformers_weight_conversion``,
  which maps ERNIE MoE like Qwen2-MoE) rewrites *every* target whose name ends in ``gate_proj``,
  ``up_proj`` or ``down_proj`` -- ``model.layers.0.mlp.gate_proj`` and
  ``mlp.shared_experts.gate_proj`` included -- into the routed experts' 3D parameters (gate/up at
  twice the rank, through ``rank_pattern``), and drops them as modules: the dense layer's FFN and
  the shared experts get no LoRA at all. ``literal_targets=True`` builds with that conversion
  off, so the names target the ``nn.Linear`` modules they name; :func:`run_hf`
  (``vllm_ernie45.testing.parity``) loads every adapter with it off and checks that every tensor
  of the file was loaded.

:func:`to_per_expert_adapter` rewrites a 3D expert adapter into the per-expert ("2D") layout
(``mlp.experts.<e>.gate_proj/up_proj/down_proj.lora_A/B``, what PEFT saved on transformers 4):
the same weights, the layout vLLM's ERNIE MoE classes read by default (``is_3d_moe_weight``
False). PEFT on transformers 5 cannot load it; the HF reference uses the 3D file.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

# The attention and dense-FFN projections (HF ERNIE 4.5 module names).
ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Regexes (PEFT matches a string ``target_modules`` against the whole module name) for the
# MoE model's nn.Linear parts; use them with ``literal_targets=True``.
ATTENTION = r".*\.self_attn\.(q|k|v|o)_proj"
DENSE_MLP = r".*\.layers\.{layers}\.mlp\.(gate|up|down)_proj"
SHARED_EXPERTS = r".*\.mlp\.shared_experts\.(gate|up|down)_proj"
# The routed experts' 3D parameters (``target_parameters``).
ROUTED_EXPERTS = ("gate_up_proj", "down_proj")


def dense_mlp_regex(layers: Sequence[int]) -> str:
    """The FFN projections of the dense (non-MoE) decoder layers ``layers``."""
    return DENSE_MLP.format(layers="(" + "|".join(str(i) for i in layers) + ")")


@contextlib.contextmanager
def peft_v5_conversion_off() -> Iterator[None]:
    """PEFT's transformers-v5 MoE config and state-dict conversion switched off for the block
    (both are looked up by module attribute at each call), so ``target_modules`` and the
    adapter file are taken as written. Without a v5 conversion in this PEFT: does nothing."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        yield
        return
    saved = {}
    for name, replacement in (
        ("convert_peft_config_for_transformers", lambda *args, **kwargs: None),
        ("convert_peft_adapter_state_dict_for_transformers", lambda *args, **kwargs: kwargs["adapter_state_dict"]),
    ):
        if hasattr(conversion, name):
            saved[name] = getattr(conversion, name)
            setattr(conversion, name, replacement)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(conversion, name, original)


def make_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    targets: tuple[str, ...] | str = ATTENTION_AND_MLP,
    rank: int = 8,
    seed: int = 0,
    scale: float = 0.2,
    target_parameters: tuple[str, ...] | None = None,
    literal_targets: bool = False,
) -> Path:
    """``targets``: PEFT ``target_modules`` (names, or one regex string); ``target_parameters``:
    PEFT's 3D-parameter targets (the MoE model's routed experts, :data:`ROUTED_EXPERTS`);
    ``literal_targets``: PEFT's transformers-v5 MoE conversion off (module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=0.0,
        **({"target_parameters": list(target_parameters)} if target_parameters else {}),
    )
    with peft_v5_conversion_off() if literal_targets else contextlib.nullcontext():
        peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale / param.shape[-1] ** 0.5)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def adapter_tensors(adapter_dir: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


def _write_adapter(out_dir: Path, config: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


_EXPERTS_3D = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<inner>base_layer\.)?lora_(?P<ab>[AB])\.weight$")


def to_per_expert_adapter(adapter_dir: str | Path, out_dir: str | Path, model_dir: str | Path) -> Path:
    """The routed-expert LoRA of a 3D adapter (PEFT ``target_parameters``) rewritten per expert
    -- ``<layer>.mlp.experts.<e>.{gate,up,down}_proj.lora_{A,B}.weight`` -- and every other
    tensor as it is. Expert ``e``'s factors are PEFT's (and vLLM's ``_stack_moe_lora_weights``)
    reading of the 3D tensors: ``lora_A.reshape(E, r, in)[e]``, ``lora_B.reshape(out, r, E)[..., e]``;
    gate and up share gate/up's ``lora_A`` and take the first / second half of its ``lora_B``
    rows (HF ERNIE's ``gate_up_proj`` is gate then up). The inner ParamWrapper
    (``experts.base_layer``) is gate/up, the outer one down -- the convention vLLM reads; the
    shapes are checked against ``model_dir``'s config. Needs one rank for every tensor (no
    ``rank_pattern``)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    model_cfg = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter, num_experts = model_cfg["hidden_size"], model_cfg["moe_intermediate_size"], model_cfg["moe_num_experts"]
    rank = config["r"]
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: rank_pattern/alpha_pattern set; the per-expert layout has one rank "
                         f"and alpha ({config.get('rank_pattern')}, {config.get('alpha_pattern')})")
    tensors = adapter_tensors(adapter_dir)
    out: dict = {}
    experts: dict[str, dict[str, object]] = {}
    for key, value in tensors.items():
        match = _EXPERTS_3D.match(key)
        if match is None:
            out[key] = value
            continue
        which = "gate_up" if match["inner"] else "down"
        experts.setdefault(match["prefix"], {})[f"{which}_{match['ab']}"] = value
    if not experts:
        raise ValueError(f"{adapter_dir} holds no 3D routed-expert LoRA (mlp.experts.[base_layer.]lora_A/B)")
    for prefix, parts in experts.items():
        if set(parts) != {"gate_up_A", "gate_up_B", "down_A", "down_B"}:
            raise ValueError(f"{prefix}: expected gate/up (experts.base_layer) and down (experts) LoRA, got {sorted(parts)}")
        want = {"gate_up_A": (rank * num_experts, hidden), "gate_up_B": (2 * inter, rank * num_experts),
                "down_A": (rank * num_experts, inter), "down_B": (hidden, rank * num_experts)}
        for name, shape in want.items():
            if tuple(parts[name].shape) != shape:
                raise ValueError(f"{prefix} {name}: shape {tuple(parts[name].shape)}, expected {shape} "
                                 f"(r={rank}, E={num_experts}, H={hidden}, I={inter})")
        gu_a = parts["gate_up_A"].reshape(num_experts, rank, hidden)
        gu_b = parts["gate_up_B"].reshape(2 * inter, rank, num_experts)
        d_a = parts["down_A"].reshape(num_experts, rank, inter)
        d_b = parts["down_B"].reshape(hidden, rank, num_experts)
        for e in range(num_experts):
            base = f"{prefix}.{e}"
            out[f"{base}.gate_proj.lora_A.weight"] = gu_a[e].clone()
            out[f"{base}.gate_proj.lora_B.weight"] = gu_b[:inter, :, e].clone()
            out[f"{base}.up_proj.lora_A.weight"] = gu_a[e].clone()
            out[f"{base}.up_proj.lora_B.weight"] = gu_b[inter:, :, e].clone()
            out[f"{base}.down_proj.lora_A.weight"] = d_a[e].clone()
            out[f"{base}.down_proj.lora_B.weight"] = d_b[:, :, e].clone()
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    config = {**config, "target_modules": sorted({*modules, "gate_proj", "up_proj", "down_proj"}),
              "target_parameters": None}
    return _write_adapter(Path(out_dir), config, out)


def restrict_adapter(adapter_dir: str | Path, out_dir: str | Path, keep: str, target_modules: str | list[str]) -> Path:
    """A copy of an adapter with only the tensors whose names match the regex ``keep``
    (``re.search``) and ``target_modules`` naming just those modules (PEFT would otherwise
    add LoRA modules the file has no weights for); ``target_parameters`` dropped when no 3D
    expert tensor is kept."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    tensors = {k: v for k, v in adapter_tensors(adapter_dir).items() if re.search(keep, k)}
    if not tensors:
        raise ValueError(f"no tensor of {adapter_dir} matches {keep!r}")
    config = {**config, "target_modules": target_modules}
    if not any(_EXPERTS_3D.match(k) for k in tensors):
        config["target_parameters"] = None
    return _write_adapter(Path(out_dir), config, tensors)


def cast_adapter(adapter_dir: str | Path, dtype: str) -> Path:
    """Store the adapter's tensors in ``dtype`` (in place), so that an engine serving it in that
    dtype and an fp32 reference read the same values."""
    import torch
    from safetensors.torch import save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in adapter_tensors(adapter_dir).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(adapter_dir)
