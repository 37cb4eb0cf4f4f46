"""Load a (quantized) checkpoint into the plugin's model and into vLLM's in-tree ERNIE model,
without an engine, and compare every parameter as loaded.

For checkpoints vLLM's CPU build cannot run (quantized experts: its CPU int4 / int8 / FP8
expert kernels refuse them on a CPU without AMX), this still checks the part the plugin owns:
which tensor goes into which parameter, shard and expert. Both models are built under the
checkpoint's quantization config (the quantization methods register their parameters), every
parameter is first filled with a sentinel, then each model's ``load_weights`` reads the
checkpoint, and nothing else runs (no ``process_weights_after_loading``, which would repack
for a kernel). vLLM's in-tree loader (``AutoWeightsLoader`` + the fused-MoE expert mapping)
is the reference placement.

    python -m vllm_ernie45.testing.quant_load --model DIR [DIR ...] --out report.json

The report, per checkpoint: ``quant_method``, the plugin's parameters (name -> shape, dtype),
the parameters each model left holding the sentinel, and the names whose values differ
between the two models. With ``--edits '{case: edit}'`` it reports instead the error the
plugin's loader raises on the checkpoint edited as each case says (``drop`` a tensor, ``add``
or ``reshape`` one), None where it loads.

The kernel checks answered yes are vLLM's CPU expert kernels' (AMX, symmetric int4, their own
routing) and its CPU linear kernel choice (FP8 block, 8-bit weight-only), where it finds none.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

SENTINEL_INT = 77

# Plugin parameter name -> in-tree name, where they differ.
_INTREE_NAMES = ((".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"),)


def _intree_name(name: str) -> str:
    for plugin, intree in _INTREE_NAMES:
        if name.endswith(plugin):
            return name[: -len(plugin)] + intree
    return name


def _fill_sentinel(model) -> None:
    import torch

    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.is_floating_point():
                param.data.fill_(float("nan"))
            else:
                param.data.fill_(SENTINEL_INT)


def _unset(param) -> bool:
    import torch

    data = param.data
    if data.numel() == 0:
        return False
    if data.is_floating_point():
        return bool(torch.isnan(data.float()).all())
    return bool((data == SENTINEL_INT).all())


def _weights(model_dir: str):
    from safetensors.torch import load_file

    for file in sorted(Path(model_dir).glob("*.safetensors")):
        yield from load_file(str(file)).items()


_PATCHED = False


def _answer_kernel_checks_yes() -> None:
    # vLLM picks the expert kernel while it builds the layer, and its CPU expert kernels
    # refuse these checkpoints here (int4 / int8 / FP8 need AMX, int4 needs symmetric
    # weights, and they run the router themselves, so not the plugin's routing function).
    # Nothing runs in this process: each CPU expert kernel's check is answered yes, so that
    # the quantization method registers the parameters the checkpoint fills.
    from vllm.model_executor.layers.fused_moe import modular_kernel
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    for module in (cpu_moe, modular_kernel):
        for obj in vars(module).values():
            if isinstance(obj, type) and "is_supported_config" in vars(obj):
                obj.is_supported_config = staticmethod(lambda *a, **k: (True, None))
    # The same for the CPU linear kernels (FP8 and 8-bit weight-only layers have none).
    from vllm.model_executor.kernels import linear as linear_kernels
    from vllm.model_executor.kernels.linear.mixed_precision import cpu as cpu_mixed

    def lenient(choose):
        def choose_or_force(*args, **kwargs):
            try:
                return choose(*args, **kwargs)
            except ValueError:  # none here: the first one, its checks answered yes
                strict = linear_kernels.is_supported_and_can_implement_kernel
                linear_kernels.is_supported_and_can_implement_kernel = lambda *a, **k: (True, None)
                try:
                    kernel = choose(*args, **kwargs)
                finally:
                    linear_kernels.is_supported_and_can_implement_kernel = strict
                kernel.is_supported = classmethod(lambda cls, *a, **k: (True, None))
                return kernel

        return choose_or_force

    linear_kernels.choose_scaled_mm_linear_kernel = lenient(linear_kernels.choose_scaled_mm_linear_kernel)
    for obj in vars(cpu_mixed).values():
        if isinstance(obj, type) and "can_implement" in vars(obj):
            obj.can_implement = classmethod(lambda cls, config: (True, None))


def _setup(model_dir: str, dtype: str):
    """The engine config of ``model_dir`` and this process's (single-rank) distributed state."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs

    global _PATCHED
    if not _PATCHED:
        _answer_kernel_checks_yes()
        _PATCHED = True
    args = EngineArgs(
        model=model_dir, dtype=dtype, enforce_eager=True, skip_tokenizer_init=True, max_model_len=256
    )
    vllm_config = args.create_engine_config()
    torch.set_default_dtype(vllm_config.model_config.dtype)
    if torch.distributed.is_initialized():  # an earlier checkpoint of this process
        return args, vllm_config
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method="file://" + tempfile.mktemp(),
        )
        initialize_model_parallel(1, 1)
    return args, vllm_config


def _build(args, cls, vllm_config=None):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import initialize_model

    config = vllm_config or args.create_engine_config()  # its own attention layer names
    with set_current_vllm_config(config):
        model = initialize_model(config, model_class=cls)
    _fill_sentinel(model)
    return model


def load_both(model_dir: str, dtype: str = "bfloat16") -> dict[str, Any]:
    import torch
    from vllm.model_executor.models.ernie45_moe import Ernie4_5_MoeForCausalLM

    from vllm_ernie45.model import ErnieMoeForCausalLM

    args, vllm_config = _setup(model_dir, dtype)
    models = {}
    for key, cls in (("plugin", ErnieMoeForCausalLM), ("intree", Ernie4_5_MoeForCausalLM)):
        model = _build(args, cls, vllm_config if key == "plugin" else None)
        with torch.no_grad():
            model.load_weights(_weights(model_dir))
        models[key] = model
    plugin = dict(models["plugin"].named_parameters())
    intree = dict(models["intree"].named_parameters())
    differ, absent = [], []
    for name, param in plugin.items():
        other = intree.get(_intree_name(name))
        if other is None:
            absent.append(name)
            continue
        a, b = param.data, other.data
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            torch.nan_to_num(a.float()) if a.is_floating_point() else a,
            torch.nan_to_num(b.float()) if b.is_floating_point() else b,
        )
        if not same:
            differ.append(name)
    quant = vllm_config.quant_config
    return {
        "quant_method": quant.get_name() if quant is not None else None,
        "params": {n: [list(p.shape), str(p.dtype)] for n, p in plugin.items()},
        "plugin_unset": [n for n, p in plugin.items() if _unset(p)],
        "intree_unset": [n for n, p in intree.items() if _unset(p)],
        "differ": differ,
        "absent_in_intree": absent,
    }


def _edited(model_dir: str, edit: dict[str, Any]):
    """The checkpoint's tensors with one edit: ``drop`` a name, ``add`` [name, shape] (zeros,
    int32), ``reshape`` [name, shape] (zeros of the tensor's dtype)."""
    import torch

    for name, tensor in _weights(model_dir):
        if name == edit.get("drop"):
            continue
        if "reshape" in edit and name == edit["reshape"][0]:
            tensor = torch.zeros(edit["reshape"][1], dtype=tensor.dtype)
        yield name, tensor
    if "add" in edit:
        yield edit["add"][0], torch.zeros(edit["add"][1], dtype=torch.int32)


def plugin_load_errors(model_dir: str, edits: dict[str, dict[str, Any]], dtype: str = "bfloat16") -> dict[str, str | None]:
    """Case -> the error the plugin's loader raises on the checkpoint edited as the case says
    (``"<type>: <message>"``; None where it loads)."""
    import torch

    from vllm_ernie45.model import ErnieMoeForCausalLM

    args, vllm_config = _setup(model_dir, dtype)
    errors: dict[str, str | None] = {}
    for i, (case, edit) in enumerate(edits.items()):
        model = _build(args, ErnieMoeForCausalLM, vllm_config if i == 0 else None)
        try:
            with torch.no_grad():
                model.load_weights(_edited(model_dir, edit))
            errors[case] = None
        except Exception as err:  # noqa: BLE001 - reported to the test
            errors[case] = f"{type(err).__name__}: {err}"
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, nargs="+", help="one or more checkpoints")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--edits", help="JSON {case: edit}: report the plugin's load errors instead")
    args = parser.parse_args(argv)
    if args.edits:
        report = {m: plugin_load_errors(m, json.loads(args.edits), args.dtype) for m in args.model}
    else:
        report = {m: load_both(m, args.dtype) for m in args.model}
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
