"""MTP speculative decoding with the plugin's draft (vllm_ernie45.mtp), real vLLM on CPU.

Lossless: greedy tokens with ``speculative_config={"method": "mtp", "num_speculative_tokens":
k}`` equal those without, for k = 1, 2, 3, a batch of four prompts, and under
``tensor_parallel_size=2`` -- on a tiny checkpoint with a random MTP head (the draft is
rejected: vLLM's rejection path) and on one whose head agrees with the model by construction
(``vllm_ernie45.tiny.mtp_agree``: every draft accepted, which also checks the draft's math --
norms, projection, RoPE, shared head -- end to end). A checkpoint without the MTP head is one
clear error.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from vllm_ernie45.parity import default_prompts
from vllm_ernie45.tiny.checkpoint import make_tiny_checkpoint

from conftest import run_python, run_vllm_greedy

MAX_TOKENS = 16
EAGER = {"enforce_eager": True}


def mtp(k: int, **extra) -> dict:
    return {**EAGER, **extra, "speculative_config": {"method": "mtp", "num_speculative_tokens": k}}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp-prompts") / "prompts.json"
    path.write_text(json.dumps(default_prompts(1024, n=4)))
    return path


@pytest.fixture(scope="module")
def random_head(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mtp-random") / "m", "legacy", with_tokenizer=False)


@pytest.fixture(scope="module")
def agreeing_head(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("mtp-agree") / "m", "legacy", with_tokenizer=False, mtp_agree=True
    )


def greedy(model, tmp_path, name: str, prompts, vllm_args: dict) -> dict:
    return run_vllm_greedy(model, tmp_path / f"{name}.json", prompts=prompts, max_tokens=MAX_TOKENS,
                           top_k=1, vllm_args=vllm_args)  # fmt: skip


@pytest.fixture(scope="module")
def random_plain(random_head, prompts, tmp_path_factory):
    return greedy(random_head, tmp_path_factory.mktemp("mtp-plain"), "plain", prompts, EAGER)


def tokens(result: dict) -> list[list[int]]:
    return [o["tokens"] for o in result["outputs"]]


def acceptance(result: dict) -> float:
    counts = result["spec_decode"]
    return counts["accepted_tokens"] / max(counts["draft_tokens"], 1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_lossless_with_a_rejected_draft(k, random_head, random_plain, prompts, tmp_path):
    result = greedy(random_head, tmp_path, f"k{k}", prompts, mtp(k))
    assert result["model_class"] == "vllm_ernie45.model.ErnieMoeForCausalLM"
    assert tokens(result) == tokens(random_plain)
    counts = result["spec_decode"]
    assert counts["drafts"] > 0 and counts["draft_tokens"] == k * counts["drafts"]


@pytest.mark.parametrize("k", [1, 3])
def test_agreeing_head_is_accepted_and_lossless(k, agreeing_head, prompts, tmp_path):
    plain = greedy(agreeing_head, tmp_path, "plain", prompts, EAGER) if k == 1 else None
    result = greedy(agreeing_head, tmp_path, f"k{k}", prompts, mtp(k))
    assert acceptance(result) >= 0.95, result["spec_decode"]
    if plain is not None:
        assert tokens(result) == tokens(plain)


def test_transposed_projection_is_detected(prompts, tmp_path):
    """``mtp_linear_proj`` stored ``[2H, H]`` (reported for some 300B -PT checkpoints) loads
    transposed: the agreeing head still agrees, which it would not if the halves were mixed."""
    model = make_tiny_checkpoint(tmp_path / "m", "legacy", with_tokenizer=False, mtp_agree=True,
                                 mtp_transposed=True)  # fmt: skip
    shape = load_file(str(model / "model.safetensors"))["model.mtp_linear_proj.0.weight"].shape
    assert tuple(shape) == (128, 64)
    result = greedy(model, tmp_path, "k1", prompts, mtp(1))
    assert acceptance(result) >= 0.95, result["spec_decode"]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor_parallel_size=2 on CPU needs 2 cores")
def test_lossless_under_tensor_parallel_2(random_head, random_plain, agreeing_head, prompts, tmp_path):
    result = greedy(random_head, tmp_path, "tp2", prompts, mtp(2, tensor_parallel_size=2))
    assert tokens(result) == tokens(random_plain)
    agreed = greedy(agreeing_head, tmp_path, "tp2-agree", prompts, mtp(1, tensor_parallel_size=2))
    assert acceptance(agreed) >= 0.95, agreed["spec_decode"]


def _start_mtp(model) -> str:
    """Start vLLM with MTP on ``model``; it must fail. Returns its combined output."""
    code = (
        "import vllm\n"
        "if __name__ == '__main__':\n"
        f"    vllm.LLM(model={str(model)!r}, dtype='float32', enforce_eager=True,\n"
        "             skip_tokenizer_init=True, max_model_len=256, gpu_memory_utilization=0.3,\n"
        "             speculative_config={'method': 'mtp', 'num_speculative_tokens': 1})\n"
    )
    proc = run_python(["-c", code], timeout=300)
    assert proc.returncode != 0, "vLLM started MTP on a checkpoint without an MTP head"
    return proc.stdout + proc.stderr


def test_checkpoint_without_mtp_tensors_is_one_clear_error(random_head, tmp_path):
    broken = tmp_path / "no-mtp"
    shutil.copytree(random_head, broken)
    tensors = {k: v for k, v in load_file(str(broken / "model.safetensors")).items() if ".mtp_" not in k}
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = _start_mtp(broken)
    assert "needs ERNIE 4.5's MTP head, but the checkpoint lacks" in out
    assert "'model.mtp_emb_norm.0.weight'" in out and "'model.mtp_linear_proj.0.weight'" in out


def test_config_without_mtp_layers_is_one_clear_error(tiny_checkpoint):
    out = _start_mtp(tiny_checkpoint("21b"))  # transformers-5 config: no num_nextn_predict_layers
    assert "needs ERNIE 4.5's MTP head, but the checkpoint's config.json has no 'num_nextn_predict_layers'" in out
