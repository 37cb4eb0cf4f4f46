"""Installing the plugin never stops vLLM, end to end: with a vLLM the plugin does not
support (pretended in every process: ``vllm_ernie45.testing.pretend_version``), a tiny
non-ERNIE model (Llama) still serves through ``vllm.LLM`` and ``vllm serve`` with HF's
greedy tokens, and an ERNIE checkpoint is served by vLLM's in-tree class -- each process
logging the plugin's warning once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_ernie45.testing.parity import APPLY_MODEL_ENV
from vllm_ernie45.testing.pretend_version import out_of_range_version, pretend_vllm_version_env

REPO = Path(__file__).resolve().parent.parent
PROMPT = [5, 17, 99, 3, 250, 41]
MAX_TOKENS = 6
WARNING = "vllm-ernie45 0.1.0 is not active"

_LLM_CHILD = """
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm_ernie45.child_run import close_llm
    from vllm_ernie45.testing.parity import model_facts
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=256, gpu_memory_utilization=0.3, seed=0)
    facts = llm.apply_model(model_facts)[0]
    params = SamplingParams(max_tokens=%d, temperature=0.0, ignore_eos=True, detokenize=False)
    out = llm.generate([{"prompt_token_ids": %r}], params, use_tqdm=False)
    shutdown = close_llm(llm)
    print("RESULT " + json.dumps({"model_class": facts["model_class"], "shutdown": shutdown,
                                  "tuned_config_folder": facts["tuned_config_folder"],
                                  "tokens": list(out[0].outputs[0].token_ids)}))
""" % (MAX_TOKENS, PROMPT)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (fp32) with the tiny tokenizer, made by transformers (head_dim 32:
    vLLM's CPU attention needs >= 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vllm_ernie45.testing.tiny.tokenizer import TINY_VOCAB_SIZE, build_ernie_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.float32)
    for param in model.parameters():  # larger than HF's init, so greedy tokens differ per step
        torch.nn.init.normal_(param, std=0.2)
    model.save_pretrained(path, safe_serialization=True)
    build_ernie_tokenizer(path)
    return path


def hf_greedy(model_dir: Path) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             min_new_tokens=MAX_TOKENS, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def run_llm_out_of_range(model_dir: Path, tmp_path: Path) -> tuple[dict, str]:
    env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **APPLY_MODEL_ENV,
           **pretend_vllm_version_env(tmp_path / "site", out_of_range_version())}
    proc = subprocess.run([sys.executable, "-c", _LLM_CHILD, str(model_dir)], capture_output=True,
                          text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    results = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and results, log[-6000:]
    return json.loads(results[-1][len("RESULT "):]), log


def plugin_warnings(log: str) -> list[str]:
    return [l for l in log.splitlines() if WARNING in l]


def test_llama_serves_through_llm_with_an_unsupported_vllm(tiny_llama, tmp_path):
    result, log = run_llm_out_of_range(tiny_llama, tmp_path)
    assert result["model_class"].startswith("vllm.model_executor.models.llama."), result
    assert result["tokens"] == hf_greedy(tiny_llama)
    # the front end and the engine core each say it once
    assert len(plugin_warnings(log)) >= 1, log[-4000:]
    assert all(out_of_range_version() in w for w in plugin_warnings(log))


def test_llama_with_the_plugin_active_is_served_as_without_it(tiny_llama, tmp_path):
    """In range, the plugin registers -- and still changes nothing for another model: vLLM's
    Llama class, HF's tokens, and vLLM's own fused-MoE table lookup (no plugin tables)."""
    env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **APPLY_MODEL_ENV, "VLLM_ERNIE45_STRICT": "1"}
    env.pop("VLLM_TUNED_CONFIG_FOLDER", None)
    proc = subprocess.run([sys.executable, "-c", _LLM_CHILD, str(tiny_llama)], capture_output=True,
                          text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    results = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and results, log[-6000:]
    result = json.loads(results[-1][len("RESULT "):])
    assert "vllm-ernie45 0.1.0 (vLLM" in log and not plugin_warnings(log)  # the plugin is active
    assert result["model_class"].startswith("vllm.model_executor.models.llama."), result
    assert result["tuned_config_folder"] is None
    assert result["tokens"] == hf_greedy(tiny_llama)


def test_ernie_falls_back_to_the_in_tree_class_with_an_unsupported_vllm(tiny_checkpoint, tmp_path):
    result, log = run_llm_out_of_range(tiny_checkpoint("21b"), tmp_path)
    assert result["model_class"].startswith("vllm.model_executor.models.ernie45_moe."), result
    assert len(result["tokens"]) == MAX_TOKENS
    assert plugin_warnings(log), log[-4000:]
    assert "in-tree ERNIE 4.5 classes" in plugin_warnings(log)[0]
    assert result["tuned_config_folder"] is None  # nothing of the plugin's is in effect


def test_llama_serves_through_vllm_serve_with_an_unsupported_vllm(tiny_llama, tmp_path, monkeypatch):
    from shutil import which

    if which("vllm") is None:
        pytest.skip("no `vllm` executable")
    httpx = pytest.importorskip("httpx")
    sys.path.insert(0, str(REPO / "scripts" / "serving"))
    try:
        import serve_load
    finally:
        sys.path.pop(0)

    for key, value in pretend_vllm_version_env(tmp_path / "site", out_of_range_version()).items():
        monkeypatch.setenv(key, value)
    port = serve_load.free_port()
    log_path = tmp_path / "server.log"
    cmd = ["vllm", "serve", str(tiny_llama), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny-llama", "--dtype", "float32", "--max-model-len", "256",
           "--seed", "0", *serve_load.CPU_ENGINE_ARGS.split()]
    env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            serve_load.wait_healthy(url, 300, proc)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"server did not start: {e}\n{log_path.read_text(errors='replace')[-4000:]}")
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tiny-llama", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
    finally:
        serve_load.stop_server(proc)
    log = log_path.read_text(errors="replace")
    assert reply.status_code == 200, (reply.text, log[-4000:])
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["token_ids"] == hf_greedy(tiny_llama)  # vLLM's return_token_ids extension
    assert plugin_warnings(log), log[-4000:]
