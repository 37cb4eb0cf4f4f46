"""How much device memory to give vLLM by default, per platform."""

from __future__ import annotations

# On the CPU backend vLLM's ``gpu_memory_utilization`` sizes the KV cache in host memory;
# its default (~0.9) fails at start-up on a machine that also runs anything else.
CPU_MEMORY_UTILIZATION = 0.3


def default_memory_utilization() -> float | None:
    """0.3 on vLLM's CPU platform; None (vLLM's own default) elsewhere."""
    from vllm.platforms import current_platform

    return CPU_MEMORY_UTILIZATION if current_platform.is_cpu() else None
