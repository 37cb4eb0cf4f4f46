#!/usr/bin/env python3
"""Bounded load/soak run of ``vllm serve`` with the ``ernie45`` parsers (loopback only).

    python scripts/serving/serve_load.py --out load.json                 # start a server on a tiny checkpoint
    python scripts/serving/serve_load.py --url http://127.0.0.1:8000 --requests 16 --out load.json

Without ``--url`` it writes a tiny random ERNIE 4.5 checkpoint (with tokenizer), starts
``vllm serve`` on 127.0.0.1 (free port, both ``ernie45`` parsers, CPU-friendly flags), and
kills it at the end. It then sends ``--requests`` streaming chat requests at once (some with
tools, reasoning on/off through ``chat_template_kwargs``, mixed prompt lengths and
``max_tokens``), closes a share of the streams mid-way, and checks that

* every request that was not cancelled finished with a well-formed response
  (``finish_reason`` set, ``content``/``reasoning`` strings, ``tool_calls`` deltas indexed,
  first delta of each call with ``id`` and ``function.name``, ``finish_reason == "tool_calls"``
  only with calls);
* bad input (malformed JSON, unknown ``tool_choice`` function, prompt over ``max_model_len``,
  invalid sampling params, non-object ``chat_template_kwargs``) gets an HTTP 4xx with an
  OpenAI-style ``{"error": {"message": ...}}`` body;
* the server is healthy afterwards (``/health`` and one more request).

``--throughput N:IN:OUT`` then times N concurrent completions of IN random prompt token ids
and exactly OUT output tokens each (``ignore_eos``) and reports output and total tokens/s.
``--engine-args`` replaces the CPU defaults of the started server (e.g. on a GPU:
``"--load-format dummy --tensor-parallel-size 2 --gpu-memory-utilization 0.9"``).

Everything is bounded: a fixed number of requests, per-request timeouts and a global
``--deadline``. Writes a JSON report (``--out``) and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from vllm_ernie45.child_run import free_port

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
]

WORDS = "the weather in beijing is sunny and the model should call a tool to find out more".split()
FINISH_REASONS = {"stop", "length", "tool_calls"}


CPU_ENGINE_ARGS = "--gpu-memory-utilization 0.3 --enforce-eager"


def start_server(ckpt: Path, port: int, max_model_len: int, log_path: Path,
                 served_name: str = "tiny-ernie", engine_args: str = CPU_ENGINE_ARGS,
                 vllm_command: str = "vllm") -> subprocess.Popen:
    """Start ``vllm serve`` on 127.0.0.1:port in its own process group, output to log_path.
    ``vllm_command`` is how to run vLLM's CLI (e.g. ``python3 -m vllm.entrypoints.cli.main``
    where no ``vllm`` console script is installed)."""
    cmd = [
        *shlex.split(vllm_command), "serve", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", served_name,
        *shlex.split(engine_args),
        "--max-model-len", str(max_model_len),
        "--enable-auto-tool-choice", "--tool-call-parser", "ernie45",
        "--reasoning-parser", "ernie45",
    ]
    env = dict(os.environ)
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    log = open(log_path, "wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def stop_server(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the server's process group (it was started with its own session), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def wait_healthy(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server at {url} not healthy after {timeout:.0f}s")


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(xs)

    def p(q):
        k = (len(s) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)

    return {"p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "mean": round(sum(s) / len(s), 4)}


def make_plan(n: int, cancel_frac: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    n_cancel = round(n * cancel_frac)
    cancel_ids = set(rng.sample(range(n), n_cancel)) if n_cancel else set()
    plan = []
    for i in range(n):
        nwords = rng.choice([4, 16, 64, 200])
        plan.append({
            "id": i,
            "tools": i % 3 == 0,
            "thinking": i % 2 == 0,
            "max_tokens": rng.choice([8, 16, 32, 64, 128]),
            "prompt": " ".join(rng.choice(WORDS) for _ in range(nwords)),
            "cancel_after_chunks": rng.choice([1, 2, 3]) if i in cancel_ids else None,
        })
    return plan


def _delta_extra(delta, name):
    v = getattr(delta, name, None)
    if v is None and getattr(delta, "model_extra", None):
        v = delta.model_extra.get(name)
    return v


async def one_request(client: openai.AsyncOpenAI, model: str, item: dict, timeout: float) -> dict:
    res = {"id": item["id"], "tools": item["tools"], "thinking": item["thinking"],
           "max_tokens": item["max_tokens"], "status": None, "problems": []}
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": item["prompt"]}],
        max_tokens=item["max_tokens"],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"chat_template_kwargs": {"enable_thinking": item["thinking"]}},
    )
    if item["tools"]:
        kwargs["tools"] = TOOLS
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    content, reasoning = [], []
    calls: dict[int, dict] = {}
    finish = None
    usage = None
    try:
        async with asyncio.timeout(timeout):
            stream = await client.chat.completions.create(**kwargs)
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not chunk.choices:
                        continue
                    chunks += 1
                    ch = chunk.choices[0]
                    d = ch.delta
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    if d is not None:
                        if d.content is not None:
                            if not isinstance(d.content, str):
                                res["problems"].append(f"content delta not a string: {d.content!r}")
                            else:
                                content.append(d.content)
                        for name in ("reasoning", "reasoning_content"):
                            r = _delta_extra(d, name)
                            if r is not None:
                                if not isinstance(r, str):
                                    res["problems"].append(f"{name} delta not a string: {r!r}")
                                elif name == "reasoning" or not reasoning:
                                    reasoning.append(r)
                        for tc in d.tool_calls or []:
                            if tc.index is None or not isinstance(tc.index, int):
                                res["problems"].append(f"tool_call delta without index: {tc}")
                                continue
                            if tc.index not in calls:
                                if not tc.id or tc.function is None or not tc.function.name:
                                    res["problems"].append(f"first delta of call {tc.index} lacks id/name: {tc}")
                                calls[tc.index] = {"id": tc.id, "name": tc.function.name if tc.function else None,
                                                   "arguments": ""}
                            if tc.function is not None and tc.function.arguments:
                                if not isinstance(tc.function.arguments, str):
                                    res["problems"].append("arguments delta not a string")
                                else:
                                    calls[tc.index]["arguments"] += tc.function.arguments
                    if ch.finish_reason is not None:
                        finish = ch.finish_reason
                    if item["cancel_after_chunks"] is not None and chunks >= item["cancel_after_chunks"]:
                        res["status"] = "cancelled"
                        break
            finally:
                await stream.close()
    except (asyncio.TimeoutError, TimeoutError):
        res["status"] = "failed"
        res["problems"].append(f"timed out after {timeout}s")
    except Exception as e:  # noqa: BLE001 - every error is a failed request in the report
        res["status"] = "failed"
        res["problems"].append(f"{type(e).__name__}: {e}")
    total = time.perf_counter() - t0
    res.update(ttft=ttft, total=total, chunks=chunks, finish_reason=finish,
               completion_tokens=getattr(usage, "completion_tokens", None),
               prompt_tokens=getattr(usage, "prompt_tokens", None),
               n_tool_calls=len(calls), content_chars=len("".join(content)),
               reasoning_chars=len("".join(reasoning)))
    if res["status"] is None:
        if finish not in FINISH_REASONS:
            res["problems"].append(f"finish_reason {finish!r} not in {sorted(FINISH_REASONS)}")
        if finish == "tool_calls" and not calls:
            res["problems"].append("finish_reason tool_calls without tool_calls")
        if calls and not item["tools"]:
            res["problems"].append("tool_calls without tools in the request")
        for c in calls.values():
            if c["arguments"]:
                try:
                    json.loads(c["arguments"])
                except ValueError:
                    # a stream cut by max_tokens may end inside the arguments
                    if finish != "length":
                        res["problems"].append(f"tool call arguments not JSON: {c['arguments']!r}")
        if usage is None:
            res["problems"].append("no usage chunk although include_usage was requested")
        res["status"] = "failed" if res["problems"] else "completed"
    return res


async def run_load(url: str, model: str, plan: list[dict], timeout: float) -> tuple[list[dict], float]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0,
                                timeout=timeout,
                                http_client=None)
    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one_request(client, model, it, timeout) for it in plan))
    finally:
        await client.close()
    return list(results), time.perf_counter() - t0


def bad_input_cases(model: str, max_model_len: int) -> list[tuple[str, object]]:
    msgs = [{"role": "user", "content": "hi"}]
    base = {"model": model, "messages": msgs, "max_tokens": 4}
    long_prompt = " ".join(["weather"] * (max_model_len * 2))
    return [
        ("malformed_json", b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", '),
        ("unknown_tool_choice_function", {**base, "tools": TOOLS,
                                          "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}),
        ("prompt_over_max_model_len", {**base, "messages": [{"role": "user", "content": long_prompt}]}),
        ("temperature_negative", {**base, "temperature": -1}),
        ("max_tokens_zero", {**base, "max_tokens": 0}),
        ("max_tokens_negative", {**base, "max_tokens": -5}),
        ("top_p_2", {**base, "top_p": 2}),
        ("chat_template_kwargs_not_object", {**base, "chat_template_kwargs": "enable_thinking"}),
        ("chat_template_kwargs_list", {**base, "chat_template_kwargs": [1, 2]}),
    ]


async def run_bad_input(url: str, model: str, max_model_len: int) -> list[dict]:
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for name, body in bad_input_cases(model, max_model_len):
            entry = {"case": name, "problems": []}
            try:
                if isinstance(body, bytes):
                    r = await c.post("/v1/chat/completions", content=body,
                                     headers={"Content-Type": "application/json"})
                else:
                    r = await c.post("/v1/chat/completions", json=body)
                entry["status_code"] = r.status_code
                try:
                    j = r.json()
                except ValueError:
                    j = None
                    entry["body"] = r.text[:300]
                err = j.get("error") if isinstance(j, dict) else None
                msg = err.get("message") if isinstance(err, dict) else (err if isinstance(err, str) else None)
                entry["message"] = (msg or "")[:300]
                if not 400 <= r.status_code < 500:
                    entry["problems"].append(f"HTTP {r.status_code}, expected 4xx")
                if not msg:
                    entry["problems"].append(f"no OpenAI-style error message in body: {str(j)[:300]}")
            except Exception as e:  # noqa: BLE001
                entry["problems"].append(f"{type(e).__name__}: {e}")
            entry["ok"] = not entry["problems"]
            out.append(entry)
    return out


async def check_healthy(url: str, model: str) -> dict:
    out = {"problems": []}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        try:
            r = await c.get("/health")
            out["health_status"] = r.status_code
            if r.status_code != 200:
                out["problems"].append(f"/health -> {r.status_code}")
            r = await c.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": "hello after the load"}],
                "max_tokens": 8, "tools": TOOLS})
            out["final_request_status"] = r.status_code
            if r.status_code != 200:
                out["problems"].append(f"final request -> {r.status_code}: {r.text[:300]}")
            else:
                ch = r.json()["choices"][0]
                if ch.get("finish_reason") not in FINISH_REASONS:
                    out["problems"].append(f"final request finish_reason {ch.get('finish_reason')!r}")
        except Exception as e:  # noqa: BLE001
            out["problems"].append(f"{type(e).__name__}: {e}")
    out["ok"] = not out["problems"]
    return out


def summarize(results: list[dict], wall: float) -> dict:
    done = [r for r in results if r["status"] == "completed"]
    toks = sum(r["completion_tokens"] or 0 for r in done)
    return {
        "requests": len(results),
        "completed": len(done),
        "cancelled": sum(r["status"] == "cancelled" for r in results),
        "failed": sum(r["status"] == "failed" for r in results),
        "wall_s": round(wall, 3),
        "completion_tokens": toks,
        "tokens_per_s": round(toks / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(done) / wall, 3) if wall > 0 else None,
        "ttft_s": percentiles([r["ttft"] for r in done if r["ttft"] is not None]),
        "total_s": percentiles([r["total"] for r in done]),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in done)
                           for k in sorted({r["finish_reason"] for r in done}, key=str)},
        "with_tool_calls": sum(r["n_tool_calls"] > 0 for r in done),
        "with_reasoning": sum(r["reasoning_chars"] > 0 for r in done),
    }


def parse_throughput(spec: str) -> tuple[int, int, int]:
    """``N:IN:OUT`` -> (requests, prompt tokens, output tokens)."""
    try:
        n, prompt_len, out_len = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--throughput wants N:IN:OUT (three integers), got {spec!r}") from None
    if min(n, prompt_len, out_len) < 1:
        raise ValueError(f"--throughput {spec!r}: every field must be >= 1")
    return n, prompt_len, out_len


async def run_throughput(url: str, model: str, spec: str, seed: int, timeout: float,
                         token_ids: tuple[int, int] = (300, 1000)) -> dict:
    """N concurrent completions of IN random token ids (drawn from ``token_ids``, ordinary
    tokens of the tiny tokenizer) and exactly OUT generated tokens each."""
    n, prompt_len, out_len = parse_throughput(spec)
    rng = random.Random(seed)
    prompts = [[rng.randrange(*token_ids) for _ in range(prompt_len)] for _ in range(n)]
    out = {"requests": n, "prompt_tokens_each": prompt_len, "output_tokens_each": out_len, "problems": []}
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=timeout, max_retries=0)

    async def one(prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=out_len, temperature=0.0,
                                            extra_body={"ignore_eos": True, "min_tokens": out_len})
        return time.perf_counter() - t0, r.usage.completion_tokens

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if not isinstance(r, BaseException)]
    for r in results:
        if isinstance(r, BaseException):
            out["problems"].append(f"{type(r).__name__}: {str(r)[:200]}")
    generated = sum(tokens for _, tokens in ok)
    if generated != len(ok) * out_len:
        out["problems"].append(f"generated {generated} tokens, expected {len(ok)} x {out_len}")
    out.update(completed=len(ok), wall_s=round(wall, 3), output_tokens=generated,
               output_tok_s=round(generated / wall, 1),
               total_tok_s=round((generated + len(ok) * prompt_len) / wall, 1),
               latency_s=percentiles([lat for lat, _ in ok]))
    out["ok"] = not out["problems"]
    return out


async def amain(args, url: str, model: str) -> dict:
    plan = make_plan(args.requests, args.cancel_frac, args.seed)
    results, wall = await run_load(url, model, plan, args.request_timeout)
    report = {"url": url, "model": model, "config": {
        "requests": args.requests, "cancel_frac": args.cancel_frac, "seed": args.seed,
        "max_model_len": args.max_model_len}}
    report["summary"] = summarize(results, wall)
    report["bad_input"] = [] if args.skip_bad_input else await run_bad_input(url, model, args.max_model_len)
    if args.throughput:
        report["throughput"] = await run_throughput(url, model, args.throughput, args.seed, args.request_timeout)
    report["after"] = await check_healthy(url, model)
    report["results"] = results
    problems = [f"request {r['id']}: {p}" for r in results for p in r["problems"]]
    problems += [f"throughput: {p}" for p in report.get("throughput", {}).get("problems", [])]
    problems += [f"bad input {b['case']}: {p}" for b in report["bad_input"] for p in b["problems"]]
    problems += [f"after: {p}" for p in report["after"]["problems"]]
    report["problems"] = problems
    report["ok"] = not problems
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="attach to a running server (e.g. http://127.0.0.1:8000); "
                    "default: start one on a tiny checkpoint")
    ap.add_argument("--model", help="model name (default: the first of /v1/models)")
    ap.add_argument("--checkpoint", help="checkpoint for the started server (default: a new tiny one)")
    ap.add_argument("--requests", "-n", type=int, default=64, help="concurrent streaming requests")
    ap.add_argument("--cancel-frac", type=float, default=0.2, help="share of streams closed mid-way")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--request-timeout", type=float, default=180.0)
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--deadline", type=float, default=900.0, help="hard limit for the whole run (s)")
    ap.add_argument("--skip-bad-input", action="store_true")
    ap.add_argument("--throughput", metavar="N:IN:OUT",
                    help="also time N concurrent completions of IN prompt / OUT output tokens")
    ap.add_argument("--vllm-command", default="vllm",
                    help="how to run vLLM's CLI (default: the vllm console script)")
    ap.add_argument("--engine-args", default=CPU_ENGINE_ARGS,
                    help=f"engine flags of the started server (default: {CPU_ENGINE_ARGS!r})")
    ap.add_argument("--server-log", help="log file of the started server")
    ap.add_argument("--out", help="JSON report path")
    args = ap.parse_args(argv)
    if args.throughput:
        try:
            parse_throughput(args.throughput)
        except ValueError as e:
            ap.error(str(e))

    proc = None
    tmp = None
    t_start = time.perf_counter()
    try:
        if args.url:
            url = args.url.rstrip("/")
            host = httpx.URL(url).host
            if host not in ("127.0.0.1", "localhost", "::1"):
                ap.error("--url must be a loopback address")
        else:
            tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
            ckpt = Path(args.checkpoint) if args.checkpoint else None
            if ckpt is None:
                from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint
                ckpt = make_tiny_checkpoint(Path(tmp.name) / "ckpt", "21b", with_tokenizer=True)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = Path(args.server_log or Path(tmp.name) / "server.log")
            print(f"starting vllm serve on {url} (log: {log})", file=sys.stderr)
            proc = start_server(ckpt, port, args.max_model_len, log, engine_args=args.engine_args,
                                vllm_command=args.vllm_command)
            wait_healthy(url, args.startup_timeout, proc)
        startup = time.perf_counter() - t_start
        model = args.model or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        try:
            report = asyncio.run(asyncio.wait_for(amain(args, url, model), args.deadline))
        except (asyncio.TimeoutError, TimeoutError):
            report = {"url": url, "ok": False, "problems": [f"run exceeded --deadline {args.deadline}s"]}
        report["server_startup_s"] = round(startup, 2) if proc else None
        if proc is not None:
            report["server_alive_at_end"] = proc.poll() is None
            if proc.poll() is not None:
                report["ok"] = False
                report["problems"].append(f"server exited with {proc.returncode}")
    finally:
        if proc is not None:
            stop_server(proc)
        if tmp is not None and not args.server_log:
            tmp.cleanup()
    s = report.get("summary", {})
    print(json.dumps({k: report.get(k) for k in ("ok", "server_startup_s", "throughput")} | {"summary": s,
                     "bad_input": [(b["case"], b.get("status_code"), b["ok"]) for b in report.get("bad_input", [])],
                     "problems": report["problems"][:20]}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
