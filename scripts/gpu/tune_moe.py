"""Tune vLLM's fused-MoE Triton configs for ERNIE's expert shapes on this GPU (CUDA; vLLM installed).

Writes ``E={E},N={N},device_name={GPU}.json`` per shape into ``--out`` (the format vLLM
reads through ``VLLM_TUNED_CONFIG_FOLDER``; the plugin points that at
``vllm_ernie45/moe_configs/``, where the tables are shipped), plus ``tables.json`` (all
tables under one plain file name), ``tune_log.txt`` and ``tune_summary.json``.

Shapes: ``66:8`` is the plugin's GPU default (64 routed experts, top-6, plus the 2 shared
experts fused in as always-selected experts); ``64:6`` is the unfused layout (expert
parallelism, EPLB, ``VLLM_ERNIE45_FUSE_SHARED_EXPERTS=0``) and the in-tree model's.
Per-rank shapes: ``66:8:768:2560`` is the 21B-A3B under TP=2 (N halved). A fifth field is the
expert-parallel size: ``64:6:1536:2560:2`` tunes rank 0 of EP=2 (the table is ``E=32``;
``66:8:1536:2560:2``, ``E=33``, is EP=2 with a shared slice fused on each rank), with
tokens routed over all 64 experts and the other rank's pairs masked through an ``expert_map``
exactly as vLLM's EP layer runs them, so about half of each token's experts are not local.
``--dtype fp8_w8a8`` tunes the kernel ``--quantization fp8`` runs on a Hopper GPU (vLLM 0.26
picks its Triton fused-MoE for FP8 weights with a per-tensor scale and dynamic per-tensor FP8
activations); the table is ``...,dtype=fp8_w8a8.json``.

For each token count the config that runs today (a shipped table's entry or vLLM's
default) is a candidate beside the search space, so a written entry is never slower than
it at that size. Candidates are timed the way vLLM runs them: decode-sized calls captured
in a CUDA graph, over ``--layers`` distinct weight sets (so the L2 cache holds no layer's
experts for the next), median of ``--reps`` replays; the five fastest are re-timed before
one is picked. Kernels are compiled first by a pool of processes into Triton's disk cache.

    python scripts/gpu/tune_moe.py --shapes 66:8,64:6 --out out/tuned
    python scripts/gpu/tune_moe.py --shapes 66:8:768:2560,64:6:1536:2560:2 --out out/tp2-ep2
    python scripts/gpu/tune_moe.py --dtype fp8_w8a8 --shapes 66:8 --out out/fp8
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import torch

from vllm_ernie45.expert_layout import FusedExpertLayout

TRITON_TOKENS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192]
# Weight formats the tuner knows: vLLM's table dtype selector -> bytes per weight element.
WEIGHT_BYTES = {"bf16": 2, "fp8_w8a8": 1}
SHARED_MEMORY_BUDGET = 220 * 1024  # bytes; Hopper has 227 KiB per block


# ----------------------------------------------------------------------------- search spaces


def triton_space(tokens: int, dtype: str = "bf16") -> list[dict]:
    """Candidate tiles at ``tokens``; FP8 tiles are half the bytes, so their K can be 256 at
    every size."""
    wide_k = [64, 128, 256] if dtype == "fp8_w8a8" else [64, 128]
    if tokens <= 16:
        grid = itertools.product([16], [32, 64, 128, 256], [64, 128, 256], [1], [4, 8], [2, 3, 4, 5])
    elif tokens <= 128:
        grid = itertools.product([16, 32, 64], [64, 128, 256], wide_k, [1, 16], [4, 8], [3, 4])
    else:
        grid = itertools.product([64, 128], [64, 128, 256], wide_k, [1, 16, 32], [4, 8], [3, 4])
    configs = []
    for bm, bn, bk, g, w, s in grid:
        if (bm * bk + bk * bn) * WEIGHT_BYTES[dtype] * s > SHARED_MEMORY_BUDGET:
            continue
        configs.append(
            dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=g, num_warps=w, num_stages=s)
        )
    return configs


# ----------------------------------------------------------------------------- problem set-up


def fused_shared_slots(num_experts: int) -> int:
    """Always-selected shared-expert slots in a shape: E=66 is 64 routed + 2 fused shared."""
    return 2 if num_experts == 66 else 0


def local_expert_map(global_experts: int, ep: int, device="cuda") -> torch.Tensor | None:
    """Rank 0's global -> local expert ids under EP=``ep`` (vLLM's linear placement; -1 = on
    another rank), or None without expert parallelism."""
    if ep <= 1:
        return None
    if global_experts % ep:
        raise ValueError(f"{global_experts} experts do not split over EP={ep}")
    local = global_experts // ep
    expert_map = torch.full((global_experts,), -1, dtype=torch.int32, device=device)
    expert_map[:local] = torch.arange(local, dtype=torch.int32, device=device)
    return expert_map


def expert_weights(
    local: int, rows: int, cols: int, gen, dtype: str, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's ``local`` expert matrices of ``rows`` x ``cols``, and their scales: bf16 with
    none, or FP8 with one float32 scale per expert (the per-tensor scheme of online FP8)."""
    w = torch.randn(local, rows, cols, device=device, generator=gen, dtype=torch.bfloat16) / cols**0.5
    if dtype == "bf16":
        return w, None
    scale = w.abs().amax(dim=(1, 2)).float() / torch.finfo(torch.float8_e4m3fn).max
    return (w / scale[:, None, None]).to(torch.float8_e4m3fn), scale


class Problem:
    """``layers`` weight sets of one (per-rank) layer shape and a batch of routed tokens.

    ``E`` is the global expert count; under ``ep`` > 1 the weights hold rank 0's ``E / ep``
    experts and ``expert_map`` masks the pairs routed to the other ranks. ``dtype`` is a key of
    ``WEIGHT_BYTES``; the tokens are bf16 either way (FP8 quantizes them inside the call)."""

    def __init__(
        self, E: int, top_k: int, H: int, N: int, tokens: int, layers: int, dtype: str = "bf16",
        seed: int = 0, ep: int = 1,
    ):
        if dtype not in WEIGHT_BYTES:
            raise ValueError(f"unknown weight dtype {dtype!r}; known: {sorted(WEIGHT_BYTES)}")
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.expert_map = local_expert_map(E, ep)
        local = E // ep
        self.w13, self.w2, self.quant = [], [], []
        for _ in range(layers):
            w13, s13 = expert_weights(local, 2 * N, H, gen, dtype)
            w2, s2 = expert_weights(local, H, N, gen, dtype)
            self.w13.append(w13)
            self.w2.append(w2)
            self.quant.append(None if s13 is None else fp8_quant_config(s13, s2))
        self.E, self.top_k, self.H, self.N, self.dtype, self.ep = E, top_k, H, N, dtype, ep
        self.resize(tokens, seed)

    @property
    def table_dtype(self) -> str | None:
        """vLLM's dtype selector of the table this shape reads (None: bf16)."""
        return None if self.dtype == "bf16" else self.dtype

    def resize(self, tokens: int, seed: int = 1) -> None:
        """Same weights, a new batch of ``tokens`` (each with distinct routed experts, and the
        shared ones last with weight 1 when E = 66, in the plugin's slots for them)."""
        gen = torch.Generator(device="cuda").manual_seed(seed + tokens)
        self.x = torch.randn(tokens, self.H, device="cuda", generator=gen, dtype=torch.bfloat16)
        shared = fused_shared_slots(self.E)
        routed = self.top_k - shared
        ids = []
        for _ in range(tokens):
            ids.append(torch.randperm(self.E - shared, device="cuda", generator=gen)[:routed])
        self.ids = torch.stack(ids).to(torch.int32)
        if shared:  # the plugin's slots: under EP one shared slice per rank (expert_layout)
            layout = FusedExpertLayout(self.E - shared, shared, self.ep)
            shared_ids = layout.shared_slot(torch.arange(shared, dtype=self.ids.dtype, device="cuda"))
            self.ids = torch.cat([layout.routed_slot(self.ids), shared_ids.expand(tokens, shared)], dim=-1)
        self.weights = torch.rand(tokens, self.top_k, device="cuda", generator=gen)
        self.weights[:, routed:] = 1.0
        self.tokens = tokens


def eager_time_us(fn_per_layer, layers: int, reps: int) -> float:
    for i in range(layers):
        fn_per_layer(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(layers):
            fn_per_layer(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / layers)
    return statistics.median(times)


def time_us(fn_per_layer, layers: int, reps: int, tokens: int) -> float:
    """Decode-sized calls in a CUDA graph (as vLLM runs them), large ones eagerly."""
    if tokens > 512:
        return eager_time_us(fn_per_layer, layers, reps)
    return graph_time_us(fn_per_layer, layers, reps)


def graph_time_us(fn_per_layer, layers: int, reps: int) -> float:
    """Median time of one call, from CUDA-graph replays of ``layers`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(layers):
            fn_per_layer(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(layers):
            fn_per_layer(i)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / layers)
    del graph
    return statistics.median(times)


# ----------------------------------------------------------------------------- runners


def fp8_quant_config(w13_scale: torch.Tensor, w2_scale: torch.Tensor):
    """vLLM's quant config for FP8 weights (a scale per expert) and dynamic per-tensor FP8
    activations: no activation scales given, so the call computes them."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    return fp8_w8a8_moe_quant_config(w1_scale=w13_scale, w2_scale=w2_scale)


def run_fused(p: Problem, layer: int, config: dict | None):
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config

    kwargs = {} if p.expert_map is None else dict(global_num_experts=p.E, expert_map=p.expert_map)
    if p.quant[layer] is not None:
        kwargs["quant_config"] = p.quant[layer]
    if config is None:
        return fused_experts(p.x, p.w13[layer], p.w2[layer], p.weights, p.ids, **kwargs)
    with override_config(config):
        return fused_experts(p.x, p.w13[layer], p.w2[layer], p.weights, p.ids, **kwargs)


def _warm_worker(job: tuple) -> int:
    """Compile (into Triton's disk cache) every config of one job; runs in a pool process."""
    shape, configs = job
    torch.cuda.set_device(0)
    E, top_k, H, N, tokens, ep, dtype = shape
    p = Problem(E, top_k, H, N, tokens, layers=1, dtype=dtype, ep=ep)
    done = 0
    for tokens, cfg in configs:
        if tokens != p.tokens:
            p.resize(tokens)
        try:
            run_fused(p, 0, cfg)
            done += 1
        except Exception:  # out of resources etc.: skipped in the timing pass as well
            pass
    torch.cuda.synchronize()
    return done


def warm(shape: tuple, configs: list[tuple[int, dict]], procs: int) -> None:
    if procs <= 1 or not configs:
        return
    chunks = [configs[i::procs] for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_warm_worker, [(shape, c) for c in chunks if c])


# ----------------------------------------------------------------------------- tuning


def tune_triton(
    p: Problem, tokens_list: list[int], layers: int, reps: int, procs: int, log, on_size=None
) -> tuple[dict, dict]:
    """Best config per token count, and its times; ``on_size(best)`` after each count, so a
    run cut short (a call's time limit) keeps the sizes it finished."""
    best: dict[int, dict] = {}
    times: dict[int, dict] = {}
    # Triton specialises kernels on argument values (1, multiples of 16) and on the
    # small-batch path without token sorting: compile each config at a representative size.
    def representative(tokens: int) -> int:
        return tokens if tokens <= 2 else (8 if tokens <= 8 else 64)

    jobs = sorted(
        {(representative(t), json.dumps(c, sort_keys=True)) for t in tokens_list for c in triton_space(t, p.dtype)}
    )
    t0 = time.time()
    warm((p.E, p.top_k, p.H, p.N, 64, p.ep, p.dtype), [(t, json.loads(c)) for t, c in jobs], procs)
    log(f"  compiled {len(jobs)} fused-MoE (size, config) pairs in {time.time() - t0:.0f} s")
    from vllm.model_executor.layers.fused_moe.fused_moe import try_get_optimal_moe_config

    for tokens in tokens_list:
        p.resize(tokens)
        # What runs today (a shipped table's entry or vLLM's default) stays a candidate, so
        # the written table is never slower than it at a tuned size.
        current = dict(try_get_optimal_moe_config(p.w13[0].shape, p.w2[0].shape, p.top_k, p.table_dtype, tokens))
        current.pop("SPLIT_K", None)
        default_us = time_us(lambda i: run_fused(p, i, current), layers, reps, tokens)
        results = [(default_us, current)]
        for cfg in triton_space(tokens, p.dtype):
            try:
                us = time_us(lambda i: run_fused(p, i, cfg), layers, max(5, reps // 2), tokens)
            except Exception:
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        # Re-time the five fastest with full repetitions: the winner is not a lucky sample.
        final = sorted(
            ((time_us(lambda i: run_fused(p, i, c), layers, reps, tokens), c) for _, c in results[:5]),
            key=lambda r: r[0],
        )
        best_us, best_cfg = final[0]
        best[tokens] = best_cfg
        times[tokens] = {"current_us": default_us, "tuned_us": best_us}
        log(f"  M={tokens:5d}  current {default_us:9.1f} us  tuned {best_us:9.1f} us  {best_cfg}")
        if on_size is not None:
            on_size(best)
    return best, times


def weight_bytes(top_k: int, H: int, N: int, tokens: int, E: int, ep: int = 1, dtype: str = "bf16") -> float:
    """Expert weight bytes one call streams (upper bound on distinct experts; under EP the
    expected number of rank 0's)."""
    shared = fused_shared_slots(E)
    experts_touched = min(E, tokens * (top_k - shared) + shared) / ep
    return experts_touched * 3 * H * N * WEIGHT_BYTES[dtype]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shapes",
        default="66:8,64:6",
        help="E:top_k[:N[:H[:EP]]] per shape (E=66: 2 fused shared experts); N and H default to "
        "--inter and --hidden. Per-rank shapes: TP=t divides N by t; EP=e is the fifth field "
        "(E stays the global count, the table is E/e).",
    )
    ap.add_argument("--dtype", choices=sorted(WEIGHT_BYTES), default="bf16",
                    help="expert weight format (fp8_w8a8: what --quantization fp8 runs)")
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--procs", type=int, default=12, help="compile processes")
    ap.add_argument("--triton-tokens", default=",".join(map(str, TRITON_TOKENS)))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    # "current" = what the plugin runs today: its shipped tables first, then vLLM's.
    from vllm_ernie45 import envs

    envs.use_tuned_moe_configs()
    import triton

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "tune_log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    # vLLM's own naming (device name, H200 family folded to NVIDIA_H200), so the file is
    # exactly the one its lookup opens.
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    log(f"GPU {torch.cuda.get_device_name()}; triton {triton.__version__}; weights {args.dtype}")
    summary = {"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "shapes": {}}
    tables: dict[str, dict] = {}
    for shape in args.shapes.split(","):
        parts = [int(x) for x in shape.split(":")]
        E, top_k = parts[:2]
        N = parts[2] if len(parts) > 2 else args.inter
        H = parts[3] if len(parts) > 3 else args.hidden
        ep = parts[4] if len(parts) > 4 else 1
        log(f"E={E} top_k={top_k} H={H} N={N}" + (f" EP={ep}: rank 0's {E // ep} experts" if ep > 1 else ""))
        started = time.time()
        p = Problem(E, top_k, H, N, 1, args.layers, args.dtype, ep=ep)
        name = get_config_file_name(E // ep, N, p.table_dtype)

        def save(tuned: dict, name: str = name) -> None:
            # One file with a plain name holding every table (names with '=' and ',' may not
            # travel); rewritten after every size, a partial table included.
            tables[name] = {"triton_version": triton.__version__, **{str(k): v for k, v in tuned.items()}}
            (out_dir / "tables.json").write_text(json.dumps(tables, indent=2) + "\n")

        tuned, fused = tune_triton(
            p, [int(t) for t in args.triton_tokens.split(",")], args.layers, args.reps, args.procs, log, save
        )
        log(f"  shape tuned in {time.time() - started:.0f} s")
        entry = {"fused": {str(k): v for k, v in fused.items()}}
        for t, v in fused.items():
            gb = weight_bytes(top_k, H, N, t, E, ep, args.dtype) / 1e9
            v["weights_gb_per_s"] = round(gb / v["tuned_us"] * 1e6, 1)
        summary["shapes"][shape] = entry
        for table_name, table in tables.items():
            (out_dir / table_name).write_text(json.dumps(table, indent=2) + "\n")
        del p
        torch.cuda.empty_cache()
    (out_dir / "tune_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
