"""Pre-quantized (compressed-tensors) forms of a tiny ERNIE 4.5 checkpoint, and their
dequantized twins.

``quantize_checkpoint(src, dst, scheme, ...)`` writes ``dst`` as llm-compressor would publish
it: the linear weights the scheme targets replaced by the compressed tensors the
``compressed-tensors`` package's own compressors produce (``weight_packed`` /
``weight_scale`` / ``weight_zero_point`` / ``weight_shape`` for pack-quantized,
``weight`` int8 or fp8 + ``weight_scale`` for int- / float-quantized, ``input_scale`` for
static activations), and ``quantization_config`` in config.json. The scales are min/max
(no calibration data: the weights are random anyway). ``twin`` (optional) gets the same
checkpoint with every quantized weight replaced by its dequantized value (fp32): what HF
transformers runs as the reference.

Ignored as real quantized ERNIE checkpoints ignore them: ``lm_head`` and the router
(``re:.*mlp.gate$``; vLLM keeps it fp32); ``keep_experts`` adds the routed experts
(``re:.*mlp.experts.*``), for vLLM CPU builds whose MoE kernels refuse quantized experts.

No calibration tool is needed: ``compressed-tensors`` is a vLLM dependency.

``packed_int_checkpoint`` writes GPTQ / AWQ exports' tensor layout with random values (for the
loader's mapping, and plugin against in-tree); ``fp8_checkpoint`` vLLM's ``fp8`` method's.
``write_format(name, src, dst)`` writes any of :data:`FORMATS`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

# name -> (preset, format, overrides of the weight args)
SCHEMES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "w4a16-g128": ("W4A16", "pack-quantized", {}),
    "w4a16-g32": ("W4A16", "pack-quantized", {"group_size": 32}),
    "w4a16-asym-g128": ("W4A16_ASYM", "pack-quantized", {}),
    "w4a16-asym-g32": ("W4A16_ASYM", "pack-quantized", {"group_size": 32}),
    "w8a16-g128": ("W8A16", "pack-quantized", {}),
    "w8a16-channel": ("W8A16", "pack-quantized", {"strategy": "channel", "group_size": None}),
    "w8a8-int8": ("W8A8", "int-quantized", {}),
    "fp8-dynamic": ("FP8_DYNAMIC", "float-quantized", {}),
    "fp8-static": ("FP8", "float-quantized", {}),
    "fp8-block": ("FP8_BLOCK", "float-quantized", {}),
}

ROUTER_IGNORE = "re:.*mlp.gate$"
EXPERTS_IGNORE = "re:.*mlp.experts.*"

# Tiny-checkpoint sizes every scheme divides (group 128, FP8 blocks of 128).
QUANT_SIZES = dict(hidden_size=128, intermediate_size=256, moe_intermediate_size=128)

# Parity tolerances of a quantized tiny checkpoint on vLLM's CPU build.
# bf16 activations (vLLM's CPU WNA16 kernel takes no fp32) against HF's fp32 on the same
# dequantized weights. This tiny random model is sensitive in bf16: vLLM bf16 on an
# *unquantized* sibling checkpoint differs from HF fp32 by up to 1.71 (max over every top-5
# entry, mostly tail entries near -10); quantized siblings measured 0.2-2.2; the mixed-precision
# checkpoint of tests/test_quantized.py 0.31 decode / 0.20 prefill on one machine. A wrong scale, zero point or
# shard moves the logprobs by nats and flips tokens early (the unquantized weights against the
# twin: 6.7 / 7.3, first token flip at position 1). The exact check is plugin = in-tree, and
# the loader mapping.
# On 2026-12-07's CI machine (other bf16 CPU kernels, or their thread split) the same checkpoint
# measured 1.12 decode / 2.72 prefill: the tolerance is 3.5, still half of what wrong weights move.
HF_TOL = 3.5
# Plugin and in-tree model: the same vLLM kernels on the same tensors (measured: 0).
INTREE_TOL = 1e-3

# Checkpoint formats :func:`write_format` writes from a bf16 tiny checkpoint:
# name -> (writer, its options). ``ct``: compressed-tensors (:data:`SCHEMES`); ``fp8``: vLLM's
# ``fp8`` method (AutoFP8 / ModelOpt-style per-tensor, DeepSeek-style blocks), the tensors of
# the compressed-tensors scheme renamed as that layout names them; ``gptq`` / ``awq``: those
# exports' layout with random values (no dequantized twin).
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"ct-{name}": ("ct", {"scheme": name}) for name in SCHEMES},
    "ct-fp8-dynamic+kv-scales": ("ct", {"scheme": "fp8-dynamic", "kv_cache_scales": True}),
    "fp8-per-tensor": ("fp8", {"scheme": "fp8-static"}),
    "fp8-block": ("fp8", {"scheme": "fp8-block"}),
    "gptq-g32": ("gptq", {}),
    "gptq-g32-desc-act": ("gptq", {"desc_act": True}),
    "awq-g32": ("awq", {}),
}


def _scheme(name: str):
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    preset, fmt, overrides = SCHEMES[name]
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if overrides:
        scheme.weights = scheme.weights.model_copy(update=overrides)
        scheme = QuantizationScheme.model_validate(scheme.model_dump())
    scheme.format = fmt
    return scheme


def _ignored(module: str, ignore: list[str]) -> bool:
    for pattern in ignore:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module):
                return True
        elif module == pattern or module.endswith("." + pattern):
            return True
    return False


def _weight_qparams(weight, args):
    """min/max scale and zero point of ``weight`` [out, in] for ``args``' strategy."""
    import torch
    from compressed_tensors.quantization.utils import calculate_qparams

    out, inp = weight.shape
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        grouped = weight.reshape(out, inp // args.group_size, args.group_size)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    elif strategy == "channel":
        lo, hi = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    elif strategy == "tensor":
        lo, hi = weight.min().reshape(1), weight.max().reshape(1)
    elif strategy == "block":
        bo, bi = args.block_structure  # partial blocks at the edges, as llm-compressor
        padded = torch.nn.functional.pad(weight, (0, -inp % bi, 0, -out % bo))
        blocks = padded.reshape(padded.shape[0] // bo, bo, padded.shape[1] // bi, bi)
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    else:
        raise ValueError(f"weight strategy {strategy!r} not supported here")
    scale, zero_point = calculate_qparams(lo, hi, args)
    return scale.to(torch.float32), zero_point


def compress_linear(weight, scheme) -> tuple[dict[str, Any], Any]:
    """(the checkpoint tensors of one linear layer, local names; its dequantized weight)."""
    import torch
    from compressed_tensors.compressors import BaseCompressor

    dtype = weight.dtype
    weight = weight.float()
    scale, zero_point = _weight_qparams(weight, scheme.weights)
    # Scales in the checkpoint's dtype (bf16 for a bf16 model), as llm-compressor stores them.
    scale = scale.to(dtype).float()
    state = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
    if scheme.input_activations is not None and not scheme.input_activations.dynamic:
        # Static per-tensor activation scale: a fixed range (no calibration data).
        state["input_scale"] = torch.tensor([4.0 / 448.0])
    compressor = BaseCompressor.get_value_from_registry(str(scheme.format))
    compressed = compressor.compress(state, scheme)
    if str(getattr(scheme.weights.strategy, "value", scheme.weights.strategy)) == "block":
        bo, bi = scheme.weights.block_structure  # (decompress does not take block scales)
        blocks = compressed["weight_scale"].float().repeat_interleave(bo, 0).repeat_interleave(bi, 1)
        restored = compressed["weight"].float() * blocks[: weight.shape[0], : weight.shape[1]]
    else:
        restored = compressor.decompress(dict(compressed), scheme)["weight"].float()
    if "weight_scale" in compressed:
        compressed["weight_scale"] = compressed["weight_scale"].to(dtype)
    return compressed, restored


def quantization_config(schemes: list, ignore: list[str], kv_cache_scheme: dict | None = None) -> dict[str, Any]:
    from compressed_tensors.quantization import QuantizationConfig

    formats = {str(s.format) for s in schemes}
    config = QuantizationConfig(
        config_groups={f"group_{i}": s for i, s in enumerate(schemes)},
        ignore=ignore,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        kv_cache_scheme=kv_cache_scheme,
    )
    data = config.model_dump(exclude={"quant_method"})
    import compressed_tensors

    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__, **data}


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    scheme: str | dict[str, str],
    keep_experts: bool = False,
    twin: str | Path | None = None,
    extra_ignore: tuple[str, ...] = (),
    kv_cache_scales: bool = False,
    quantize_head: bool = False,
) -> Path:
    """``dst``: ``src`` (a tiny checkpoint, single-file or sharded) with the linear layers
    ``scheme`` targets compressed (:data:`SCHEMES`); ``twin``: the dequantized copy.

    ``scheme`` a dict: {module regex: scheme name}, one config group each (the first that
    matches a layer wins; a mixed-precision checkpoint, e.g. one scheme per decoder layer).
    ``kv_cache_scales``: an FP8 kv-cache scheme with static per-tensor ``self_attn.k_scale`` /
    ``v_scale`` (as llm-compressor names them; values arbitrary). ``quantize_head``: the
    (untied) LM head quantized too."""
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_ernie45.checkpoint_files import shard_files

    src, dst = Path(src), Path(dst)
    by_pattern = {"Linear": scheme} if isinstance(scheme, str) else dict(scheme)
    groups = {}
    for pattern, name in by_pattern.items():
        qscheme = _scheme(name)
        qscheme.targets = [pattern if pattern == "Linear" else f"re:{pattern}"]
        groups[pattern] = qscheme

    def scheme_of(module: str):
        for pattern, qscheme in groups.items():
            if pattern == "Linear" or re.match(pattern, module):
                return qscheme
        return None

    ignore = ([] if quantize_head else ["lm_head"]) + [ROUTER_IGNORE, *extra_ignore]
    ignore += [EXPERTS_IGNORE] if keep_experts else []
    shutil.copytree(src, dst)
    if twin is not None:
        shutil.copytree(src, twin)
    weight_map: dict[str, str] = {}
    for file in shard_files(src):
        tensors = load_file(str(file))
        out: dict[str, torch.Tensor] = {}
        deq: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            module = name.removesuffix(".weight")
            quantize = (
                name.endswith(".weight")
                and tensor.dim() == 2
                and "norm" not in name
                and "embed_tokens" not in name
                and not _ignored(module, ignore)
                and scheme_of(module) is not None
            )
            if not quantize:
                out[name] = deq[name] = tensor
                continue
            compressed, restored = compress_linear(tensor, scheme_of(module))
            for local, value in compressed.items():
                out[f"{module}.{local}"] = value.contiguous()
            deq[name] = restored.to(torch.float32)
            if kv_cache_scales and name.endswith(".self_attn.q_proj.weight"):
                attn = name.removesuffix(".q_proj.weight")
                layer = int(attn.split(".")[2])
                out[f"{attn}.k_scale"] = torch.tensor([0.02 * (layer + 1)])
                out[f"{attn}.v_scale"] = torch.tensor([0.03 * (layer + 1)])
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update({n: file.name for n in out})
        if twin is not None:
            save_file(deq, str(Path(twin) / file.name), metadata={"format": "pt"})
    _rewrite_index(dst, weight_map)
    cfg = json.loads((dst / "config.json").read_text())
    kv_scheme = (
        {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        if kv_cache_scales
        else None
    )
    cfg["quantization_config"] = quantization_config(list(groups.values()), ignore, kv_scheme)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if twin is not None:
        tcfg = json.loads((Path(twin) / "config.json").read_text())
        tcfg["dtype"] = "float32"
        (Path(twin) / "config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    return dst


def packed_int_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 32,
    desc_act: bool = False,
    sym: bool = True,
    seed: int = 0,
) -> Path:
    """``dst``: ``src`` with every linear layer but the router and the head stored as a
    GPTQ (``method="gptq"``) or AWQ (``"awq"``, GEMM layout) export writes it, with random
    packed values (for the loader's mapping only: the values mean nothing):

    * GPTQ: ``qweight`` [in / (32/bits), out], ``qzeros`` [in / group, out / (32/bits)],
      ``scales`` [in / group, out] fp16, ``g_idx`` [in] (with ``desc_act`` a permuted order);
    * AWQ: ``qweight`` [in, out / (32/bits)], ``qzeros`` [in / group, out / (32/bits)],
      ``scales`` [in / group, out] fp16.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from vllm_ernie45.checkpoint_files import shard_files

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    pack = 32 // bits

    def ints(*shape):
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)

    weight_map: dict[str, str] = {}
    for file in shard_files(src):
        out: dict[str, torch.Tensor] = {}
        for name, tensor in load_file(str(file)).items():
            module = name.removesuffix(".weight")
            if not (
                name.endswith(".weight") and tensor.dim() == 2 and "norm" not in name
                and "embed_tokens" not in name and not _ignored(module, ["lm_head", ROUTER_IGNORE])
            ):
                out[name] = tensor
                continue
            n_out, n_in = tensor.shape
            groups = n_in // group_size
            scales = (torch.rand(groups, n_out, generator=gen) * 0.01 + 0.001).to(torch.float16)
            out[f"{module}.scales"] = scales
            out[f"{module}.qzeros"] = ints(groups, n_out // pack)
            if method == "gptq":
                out[f"{module}.qweight"] = ints(n_in // pack, n_out)
                order = torch.arange(n_in) // group_size
                if desc_act:
                    order = order[torch.randperm(n_in, generator=gen)]
                out[f"{module}.g_idx"] = order.to(torch.int32)
            else:
                out[f"{module}.qweight"] = ints(n_in, n_out // pack)
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update({n: file.name for n in out})
    _rewrite_index(dst, weight_map)
    cfg = json.loads((dst / "config.json").read_text())
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
              "sym": sym, "lm_head": False}
    else:
        qc = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
              "version": "gemm"}
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def fp8_checkpoint(ct_fp8: str | Path, dst: str | Path) -> Path:
    """``dst``: a compressed-tensors FP8 checkpoint (``fp8-static`` or ``fp8-block`` of
    :func:`quantize_checkpoint`) in the layout of vLLM's ``fp8`` method (AutoFP8 / ModelOpt
    style exports, DeepSeek-style blocks): per-tensor ``weight_scale`` and static
    ``input_scale`` as they are; block scales renamed ``weight_scale_inv``, with
    ``weight_block_size`` in the config."""
    from safetensors.torch import load_file, save_file

    from vllm_ernie45.checkpoint_files import shard_files

    src, dst = Path(ct_fp8), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    weights = next(iter(cfg["quantization_config"]["config_groups"].values()))["weights"]
    block = weights.get("block_structure")
    shutil.copytree(src, dst)
    weight_map = {}
    for file in shard_files(src):
        out = {}
        for name, tensor in load_file(str(file)).items():
            if block and name.endswith(".weight_scale"):
                name = name.removesuffix(".weight_scale") + ".weight_scale_inv"
                tensor = tensor.float()
            out[name] = tensor
        save_file(out, str(dst / file.name), metadata={"format": "pt"})
        weight_map.update({n: file.name for n in out})
    _rewrite_index(dst, weight_map)
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic" if block else "static"}
    if block:
        qc["weight_block_size"] = list(block)
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return dst


def _rewrite_index(dst: Path, weight_map: dict[str, str]) -> None:
    """A sharded checkpoint's index names the tensors the rewritten shards now hold."""
    from vllm_ernie45.checkpoint_files import SAFETENSORS_INDEX

    if (dst / SAFETENSORS_INDEX).is_file():
        index = json.loads((dst / SAFETENSORS_INDEX).read_text())
        index["weight_map"] = weight_map
        (dst / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_format(
    name: str, src: str | Path, dst: str | Path, keep_experts: bool = False, twin: str | Path | None = None
) -> tuple[Path, Path | None]:
    """``dst``: ``src`` (a bf16 tiny checkpoint) written in format ``name`` (:data:`FORMATS`),
    and its dequantized twin written to ``twin`` where the format has one (else None).
    ``keep_experts``: the routed experts left bf16 (compressed-tensors formats only)."""
    writer, options = FORMATS[name]
    dst = Path(dst)
    twin_dir = Path(twin) if twin is not None else None
    if writer == "ct":
        options = dict(options)
        return quantize_checkpoint(src, dst, options.pop("scheme"), keep_experts, twin_dir, **options), twin_dir
    if keep_experts:
        raise ValueError(f"format {name!r} quantizes every linear layer; keep_experts is for compressed-tensors")
    if writer == "fp8":
        ct = quantize_checkpoint(src, dst.with_name(dst.name + ".ct"), options["scheme"], twin=twin_dir)
        return fp8_checkpoint(ct, dst), twin_dir
    return packed_int_checkpoint(src, dst, writer, **options), None
