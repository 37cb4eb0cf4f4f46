"""PEFT LoRA adapters for the tiny checkpoints, made by PEFT itself.

``make_lora_adapter(model_dir, out_dir, targets, rank, seed)`` wraps HF transformers' model of
``model_dir`` with ``peft.LoraConfig(target_modules=targets)``, gives every LoRA matrix a random
value (PEFT initialises ``lora_B`` to zeros, an adapter that changes nothing) at a scale that
moves the tiny model's greedy tokens, and saves it with ``save_pretrained``: the
``adapter_config.json`` + ``adapter_model.safetensors`` a user's fine-tune has.
"""

from __future__ import annotations

from pathlib import Path

# The attention and dense-FFN projections (HF ERNIE 4.5 module names).
ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_lora_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    targets: tuple[str, ...] = ATTENTION_AND_MLP,
    rank: int = 8,
    seed: int = 0,
    scale: float = 0.2,
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale / param.shape[-1] ** 0.5)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out
