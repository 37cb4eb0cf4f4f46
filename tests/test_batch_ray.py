"""Ray Data's vLLM batch path (``ray.data.llm``) on a local Ray on CPU, with the plugin serving
(vllm_ernie45.testing.ray_batch; docs/batch.md, "Past one machine: Ray Data").

One engine replica as a Ray actor (a CPU bundle, no GPU) over 16 text prompts, greedy, fp32;
its token ids and text must equal those of the single-process runner
(``vllm_ernie45.batch.main``, what ``python -m vllm_ernie45.batch`` runs) on the same prompts.
Both jobs run at once, each in its own process group. Ray is in the 0.32.0 lock only: where it
is not installed (the 0.27.0 leg), the test skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import vllm_ernie45

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pinned in requirements/cpu-vllm0.32.0-py3.11.lock only)",
)

# The same engine settings for both runs. gpu_memory_utilization sizes host memory for the KV
# cache on CPU: 0.1 (2.3 GiB of 23.5) leaves room for the other tests' engines (at 0.3 Ray's
# memory monitor killed the engine actor once while other engines ran).
DTYPE, MAX_MODEL_LEN, MEMORY = "float32", "256", "0.1"

# The runner's command line, with the token ids (the prompt's and the completion's) added to
# each simple-format record.
REFERENCE = """
import sys
from vllm_ernie45 import batch
if __name__ == "__main__":
    plain = batch.simple_record
    batch.simple_record = lambda item, result: {
        **plain(item, result), "prompt_token_ids": list(result.prompt_token_ids),
        "token_ids": list(result.outputs[0].token_ids)}
    sys.exit(batch.main(sys.argv[1:]))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    env["VLLM_ERNIE45_STRICT"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO, start_new_session=True)  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the job, Ray's processes, vLLM's engine
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"{proc.args[1:3]} ran past {timeout} s:\n{out[-2000:]}\n{err[-6000:]}")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_ray_data_processor_on_cpu_equals_the_single_process_runner(tmp_path):
    from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "ernie", "21b", with_tokenizer=True)
    rows = []
    for i in range(16):
        prompt = f"Story {i}: the river crossed an old bridge" if i % 2 == 0 else f"北京 {i} 是中国的首都，"
        rows.append({"id": i if i == 15 else f"p{i}", "prompt": prompt, "max_tokens": 5 if i % 5 == 4 else 8})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    ref_out, ray_out = tmp_path / "ref.jsonl", tmp_path / "ray.jsonl"
    reference = _start(["-c", REFERENCE, "--model", str(model), "-i", str(prompts), "-o", str(ref_out), "--sort",
                        "--no-progress", "--dtype", DTYPE, "--enforce-eager", "--max-model-len", MAX_MODEL_LEN,
                        "--gpu-memory-utilization", MEMORY])  # fmt: skip
    try:
        ray_job = _start(["-m", "vllm_ernie45.testing.ray_batch", "--model", str(model), "--input", str(prompts),
                          "--out", str(ray_out), "--dtype", DTYPE, "--max-model-len", MAX_MODEL_LEN,
                          "--gpu-memory-utilization", MEMORY])  # fmt: skip
        ray_stdout, ray_stderr = _finish(ray_job, 420)
    finally:
        ref_stdout, ref_stderr = _finish(reference, 420)
    assert reference.returncode == 0, ref_stdout[-2000:] + ref_stderr[-6000:]
    assert ray_job.returncode == 0, ray_stdout[-2000:] + ray_stderr[-8000:]
    assert "ray_batch: " in ray_stdout, ray_stdout[-2000:]

    # The plugin served inside the engine actor's processes (Ray forwards their output).
    log = re.sub(r"\x1b\[[0-9;]*m", "", ray_stdout + ray_stderr)
    served = re.compile(rf"MapBatches\(vLLMEngineStageUDF\).*vllm-ernie45 {re.escape(vllm_ernie45.__version__)} "
                        r"\(vLLM [^)]+\) serves Ernie4_5_MoeForCausalLM")  # fmt: skip
    assert served.search(log), log[-6000:]

    ref, got = _lines(ref_out), _lines(ray_out)
    assert [r["id"] for r in ref] == [r["id"] for r in got] == [r["id"] for r in rows]
    for want, have, row in zip(ref, got, rows):
        assert have["prompt_token_ids"] == want["prompt_token_ids"], row  # the same inputs
        assert have["token_ids"] == want["token_ids"], row
        assert have["text"] == want["completion"], row
        assert len(have["token_ids"]) == want["num_completion_tokens"] <= row["max_tokens"]
    assert sum(len(r["token_ids"]) for r in got) > 16  # not all empty
