"""The shipped fused-MoE tables (``vllm_ernie45/moe_configs``) are in the format vLLM reads,
with tiles a Hopper GPU can run, are found by vLLM through ``register()``, and the tuner's
search space stays within what it claims (``scripts/gpu/tune_moe.py``; runs on a GPU only)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "vllm_ernie45" / "moe_configs"
TABLES = sorted(CONFIG_DIR.glob("E=*.json"))
FIELDS = {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages"}
HOPPER_SMEM = 227 * 1024


def _smem_bytes(config: dict, element_bytes: int = 2) -> int:
    """Shared memory the fused-MoE kernel's pipelined A and B tiles take (bf16: 2 bytes an
    element, FP8: 1)."""
    tile = (config["BLOCK_SIZE_M"] + config["BLOCK_SIZE_N"]) * config["BLOCK_SIZE_K"] * element_bytes
    return tile * config["num_stages"]


def _element_bytes(table_name: str) -> int:
    return 1 if ",dtype=fp8_w8a8" in table_name else 2


def _load_tuner():
    spec = importlib.util.spec_from_file_location("tune_moe", ROOT / "scripts" / "gpu" / "tune_moe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_rank_shapes() -> set[tuple[int, int]]:
    """Every (E, N) a fused-MoE call of ERNIE 4.5 has on one rank: the 21B-A3B (64 experts of
    N=1536, 2 shared experts fused in as E=66; under EP=2 one shared slice fused per rank,
    E=33) and the 300B-A47B (64 experts of N=3584, no shared experts), under TP or EP of 1,
    2, 4 and 8."""
    shapes = {(33, 1536)}  # 21B EP=2, shared fused (VLLM_ERNIE45_FUSE_SHARED_EXPERTS=1)
    for size in (1, 2, 4, 8):
        shapes |= {(66, 1536 // size), (64, 1536 // size), (64 // size, 1536)}  # 21B: TP fused/unfused, EP
        shapes |= {(64, 3584 // size), (64 // size, 3584)}  # 300B: TP, EP
    return shapes


def test_tables_for_h100_and_h200_are_shipped():
    names = {p.name for p in TABLES}
    assert "E=66,N=1536,device_name=NVIDIA_H100_80GB_HBM3.json" in names
    assert "E=66,N=1536,device_name=NVIDIA_H200.json" in names
    assert "E=64,N=1536,device_name=NVIDIA_H200.json" in names
    # Per-rank shapes of the multi-GPU layouts (issue 12): TP=2/4/8 and EP=2/4/8 of the 21B
    # (EP=2 with shared experts fused too), TP=2/4/8 and EP=2/4/8 of the 300B, on both GPUs.
    for gpu in ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"):
        for e, n in [(66, 768), (66, 384), (66, 192), (32, 1536), (16, 1536), (8, 1536), (33, 1536),
                     (64, 1792), (64, 896), (64, 448), (32, 3584), (16, 3584), (8, 3584)]:
            assert f"E={e},N={n},device_name={gpu}.json" in names, (e, n, gpu)
    # --quantization fp8: the 21B on one GPU on both; on the H200 also the 21B under TP=2 and
    # the 300B under TP=4, TP=8, EP=4 and EP=8 (the FP8 300B needs 4+ GPUs).
    fp8 = [("NVIDIA_H100_80GB_HBM3", 66, 1536)] + [
        ("NVIDIA_H200", e, n) for e, n in [(66, 1536), (66, 768), (64, 896), (64, 448), (16, 3584), (8, 3584)]
    ]
    for gpu, e, n in fp8:
        assert f"E={e},N={n},device_name={gpu},dtype=fp8_w8a8.json" in names, (e, n, gpu)


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_table_is_for_a_per_rank_shape_of_ernie(path):
    e, n = (int(x) for x in re.match(r"E=(\d+),N=(\d+),", path.name).groups())
    assert (e, n) in per_rank_shapes(), path.name


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_table_is_valid_vllm_format(path):
    assert re.fullmatch(r"E=\d+,N=\d+,device_name=[A-Za-z0-9_]+(,dtype=fp8_w8a8)?\.json", path.name)
    table = json.loads(path.read_text())
    table.pop("triton_version", None)
    sizes = [int(k) for k in table]  # vLLM does int(key) for every remaining key
    assert sizes == sorted(sizes) and sizes[0] == 1 and sizes[-1] >= 4096
    for size, config in table.items():
        assert set(config) == FIELDS, (size, config)
        for key in ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K"):
            assert config[key] >= 16 and config[key] & (config[key] - 1) == 0, (size, config)
        assert _smem_bytes(config, _element_bytes(path.name)) <= HOPPER_SMEM, (size, config)
        assert config["num_warps"] in (4, 8)


def test_register_leaves_vllm_s_table_folder_alone():
    """register() runs in every vLLM process, whatever model it serves: it must not point
    vLLM's fused-MoE (and LoRA, SSM) table lookup at ERNIE's tables -- they would override
    vLLM's own tuned tables of another model with the same expert shape (e.g. E=8,N=3584 is
    also Mixtral-8x7B under TP=4). Building an ERNIE MoE model sets it in its own process
    (tests/test_parity.py checks the worker)."""
    code = (
        "import os\n"
        "import vllm_ernie45; vllm_ernie45.register()\n"
        "print('FOLDER', os.environ.get('VLLM_TUNED_CONFIG_FOLDER'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "VLLM_TUNED_CONFIG_FOLDER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FOLDER None"


def test_use_tuned_moe_configs_keeps_a_folder_the_user_set(monkeypatch):
    from vllm_ernie45 import envs

    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "")  # so that monkeypatch restores it after
    monkeypatch.delenv("VLLM_TUNED_CONFIG_FOLDER")
    envs.use_tuned_moe_configs()
    assert Path(os.environ["VLLM_TUNED_CONFIG_FOLDER"]).resolve() == CONFIG_DIR.resolve()
    monkeypatch.setenv("VLLM_TUNED_CONFIG_FOLDER", "/my/tables")
    envs.use_tuned_moe_configs()
    assert os.environ["VLLM_TUNED_CONFIG_FOLDER"] == "/my/tables"


def test_tuner_search_space_fits_hopper_and_token_sizes():
    tuner = _load_tuner()
    for tokens in tuner.TRITON_TOKENS:
        space = tuner.triton_space(tokens)
        assert len(space) >= 40, tokens
        for config in space:
            assert set(config) == FIELDS
            assert _smem_bytes(config) <= HOPPER_SMEM
        if tokens <= 16:  # decode sizes: no tile taller than needed
            assert {c["BLOCK_SIZE_M"] for c in space} == {16}
    # Weight bytes a call must stream: 8 experts of 3 x 2560 x 1536 bf16 at one token.
    assert tuner.weight_bytes(8, 2560, 1536, 1, 66) == 8 * 3 * 2560 * 1536 * 2
    assert tuner.weight_bytes(8, 2560, 1536, 1000, 66) == 66 * 3 * 2560 * 1536 * 2
    assert tuner.weight_bytes(8, 2560, 1536, 1, 66, dtype="fp8_w8a8") == 8 * 3 * 2560 * 1536


def test_tuner_fp8_space_uses_one_byte_tiles():
    """FP8 tiles take half the shared memory, so the FP8 search may use K=256 where bf16 may
    not -- and still fits Hopper at one byte an element."""
    tuner = _load_tuner()
    for tokens in tuner.TRITON_TOKENS:
        bf16, fp8 = tuner.triton_space(tokens), tuner.triton_space(tokens, "fp8_w8a8")
        assert len(fp8) >= len(bf16)
        for config in fp8:
            assert _smem_bytes(config, 1) <= HOPPER_SMEM
    big = tuner.triton_space(4096, "fp8_w8a8")
    assert any(c["BLOCK_SIZE_K"] == 256 for c in big)
    assert not any(c["BLOCK_SIZE_K"] == 256 for c in tuner.triton_space(4096))


def test_tuner_expert_parallel_map_masks_other_ranks():
    """An EP shape is tuned as vLLM runs it: rank 0 holds E / EP experts, pairs routed to the
    other ranks are -1 in the expert map (and skipped by the kernel)."""
    tuner = _load_tuner()
    expert_map = tuner.local_expert_map(64, 2, device="cpu")
    assert expert_map[:32].tolist() == list(range(32))
    assert set(expert_map[32:].tolist()) == {-1}
    assert tuner.local_expert_map(64, 1, device="cpu") is None
    with pytest.raises(ValueError, match="EP=3"):
        tuner.local_expert_map(64, 3, device="cpu")
    # At one token, rank 0 of EP=2 streams on average half of the 6 routed experts' weights.
    assert tuner.weight_bytes(6, 2560, 1536, 1, 64, ep=2) == 3 * 3 * 2560 * 1536 * 2


def test_tuner_fp8_weights_and_quant_config_match_online_fp8():
    """``--dtype fp8_w8a8`` times what ``--quantization fp8`` runs: FP8 weights with one scale per
    expert, activations quantized per tensor inside the call (no activation scale given), and
    the table vLLM then looks up is the ``fp8_w8a8`` one."""
    import torch

    tuner = _load_tuner()
    gen = torch.Generator().manual_seed(0)
    w, scale = tuner.expert_weights(4, 32, 64, gen, "fp8_w8a8", device="cpu")
    assert w.dtype == torch.float8_e4m3fn and scale.shape == (4,) and scale.dtype == torch.float32
    assert w.float().abs().amax().item() <= torch.finfo(torch.float8_e4m3fn).max
    gen = torch.Generator().manual_seed(0)
    ref, none = tuner.expert_weights(4, 32, 64, gen, "bf16", device="cpu")
    assert none is None and ref.dtype == torch.bfloat16
    # Dequantized FP8 is the bf16 weight up to FP8 rounding (3 mantissa bits: <= 1/16 relative).
    err = (w.float() * scale[:, None, None] - ref.float()).abs()
    assert (err <= ref.float().abs() / 16 + scale[:, None, None] * 2**-9).all()
    config = tuner.fp8_quant_config(scale, scale)
    assert config.use_fp8_w8a8 and config.a1_scale is None and config.block_shape is None
    assert not config.per_act_token_quant
    assert config.config_name(torch.bfloat16) == "fp8_w8a8"
