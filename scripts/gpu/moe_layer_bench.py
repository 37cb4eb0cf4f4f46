#!/usr/bin/env python3
"""One MoE layer of the 21B-A3B, kernel time per call, the plugin's way against the in-tree way
(CUDA; vLLM installed). Issue 29's kernel-level check: is the fused-shared layout, or a table
entry, slower than vLLM's in-tree model at the token counts prefill and large batches run?

Per token count M (eager calls, CUDA events, median of ``--reps`` over ``--layers`` weight sets):

    fused66:table     64 routed + 2 shared experts in one fused-MoE call (top-8), the plugin's
                      shipped E=66 table (what the plugin runs by default)
    fused66:default   the same call on vLLM's default config (the table not found)
    routed64:default  64 routed experts, top-6, vLLM's default config
    routed64:vllm     the same on what vLLM itself picks: its shipped table where it has one (the
                      H100 has E=64,N=1536; the H200 has none, so its default) -- the in-tree call
    routed64:table    the same on the plugin's E=64 table (the plugin unfused)
    shared:dense      the shared experts as a dense SwiGLU MLP (cuBLAS), as the in-tree model
                      and the unfused plugin run them
    intree            routed64:default + shared:dense (on a second stream up to 256 tokens, as
                      vLLM 0.26 does, VLLM_SHARED_EXPERTS_STREAM_TOKEN_THRESHOLD; after it above),
                      routed on routed64:vllm (before issue 29's run: on routed64:default, which on
                      an H100 is not what in-tree runs)

and, per call kind, the wall time of its first call at each M in a fresh process-private Triton
cache (``first_ms``: the JIT compile a request pays when an engine meets that config first).

    python scripts/gpu/moe_layer_bench.py --out out/moe_layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

TOKENS = [256, 512, 1024, 2048, 4096, 8192, 16384]
CONFIG_FOLDER = Path(__file__).resolve().parents[2] / "vllm_ernie45" / "moe_configs"


def table_config(E: int, N: int, M: int, device_file_name: str) -> dict | None:
    """The entry vLLM would take from the plugin's table (nearest token count), or None."""
    path = CONFIG_FOLDER / f"E={E},N={N},device_name={device_file_name}.json"
    if not path.exists():
        return None
    table = {int(k): v for k, v in json.loads(path.read_text()).items() if k.isdigit()}
    return dict(table[min(table, key=lambda k: abs(k - M))])


def vllm_config(E: int, N: int, M: int, device_file_name: str, top_k: int, H: int) -> dict:
    """What vLLM itself picks without the plugin: its shipped table (nearest entry), else its default."""
    import vllm.model_executor.layers.fused_moe as fused_moe_pkg
    from vllm.model_executor.layers.fused_moe.fused_moe import get_default_config

    path = Path(fused_moe_pkg.__file__).parent / "configs" / f"E={E},N={N},device_name={device_file_name}.json"
    if path.exists():
        table = {int(k): v for k, v in json.loads(path.read_text()).items() if k.isdigit()}
        return dict(table[min(table, key=lambda k: abs(k - M))])
    return get_default_config(M, E, N, H, top_k, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--out", default="out/moe_layer.json")
    args = ap.parse_args()
    # A private Triton cache: first_ms is a real compile, not a disk-cache hit.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-moe-layer-"))

    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.fused_moe import fused_experts, override_config
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name, get_default_config

    H, N, L = args.hidden, args.inter, args.layers
    dev = "cuda"
    device_file = get_config_file_name(66, N, None).split("device_name=")[1][: -len(".json")]
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, device=dev, generator=gen, dtype=torch.bfloat16) / shape[-1] ** 0.5)

    w13 = [rnd(66, 2 * N, H) for _ in range(L)]
    w2 = [rnd(66, H, N) for _ in range(L)]
    w13_64 = [w[:64] for w in w13]
    w2_64 = [w[:64] for w in w2]
    gate_up = [rnd(2 * 2 * N, H) for _ in range(L)]  # shared: 2 x moe_intermediate, gate + up
    down = [rnd(H, 2 * N) for _ in range(L)]
    side = torch.cuda.Stream()

    def problem(M: int):
        x = torch.randn(M, H, device=dev, generator=gen, dtype=torch.bfloat16)
        ids6 = torch.rand(M, 64, device=dev, generator=gen).argsort(dim=-1)[:, :6].to(torch.int32)
        w6 = torch.rand(M, 6, device=dev, generator=gen)
        w6 = w6 / w6.sum(-1, keepdim=True)
        ids8 = torch.cat([ids6, torch.tensor([64, 65], device=dev, dtype=torch.int32).expand(M, 2)], -1)
        w8 = torch.cat([w6, torch.ones(M, 2, device=dev)], -1)
        return x, ids6, w6, ids8.contiguous(), w8.contiguous()

    def shared_dense(x, i):
        gu = F.linear(x, gate_up[i])
        g, u = gu.chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, down[i])

    results: dict = {"gpu": torch.cuda.get_device_name(), "device_file_name": device_file, "tokens": {}}
    print(f"GPU {results['gpu']} (tables looked up as {device_file}); layers {L}, reps {args.reps}", flush=True)
    rows = []
    for M in [int(t) for t in args.tokens.split(",")]:
        x, ids6, w6, ids8, w8 = problem(M)
        cfgs = {
            "fused66:table": table_config(66, N, M, device_file),
            "fused66:default": get_default_config(M, 66, N, H, 8, None),
            "routed64:default": get_default_config(M, 64, N, H, 6, None),
            "routed64:vllm": vllm_config(64, N, M, device_file, 6, H),
            "routed64:table": table_config(64, N, M, device_file),
        }
        calls = {
            "fused66:table": lambda i: fused_experts(x, w13[i], w2[i], w8, ids8),
            "fused66:default": lambda i: fused_experts(x, w13[i], w2[i], w8, ids8),
            "routed64:default": lambda i: fused_experts(x, w13_64[i], w2_64[i], w6, ids6),
            "routed64:vllm": lambda i: fused_experts(x, w13_64[i], w2_64[i], w6, ids6),
            "routed64:table": lambda i: fused_experts(x, w13_64[i], w2_64[i], w6, ids6),
            "shared:dense": lambda i: shared_dense(x, i),
        }

        def intree(i, M=M):
            if M <= 256:  # vLLM: shared experts on the aux stream up to 256 tokens
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    s = shared_dense(x, i)
                r = fused_experts(x, w13_64[i], w2_64[i], w6, ids6)
                torch.cuda.current_stream().wait_stream(side)
                return r + s
            r = fused_experts(x, w13_64[i], w2_64[i], w6, ids6)
            return r + shared_dense(x, i)

        calls["intree"] = intree
        cfgs["intree"] = cfgs["routed64:vllm"]
        entry = {}
        for name, fn in calls.items():
            cfg = cfgs.get(name)
            if name.endswith(":table") and cfg is None:
                continue
            cfg = None if cfg is None else {k: v for k, v in cfg.items() if k != "SPLIT_K"}

            def run(i, fn=fn, cfg=cfg):
                if cfg is None:
                    return fn(i)
                with override_config(cfg):
                    return fn(i)

            torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(0)
            torch.cuda.synchronize()
            first_ms = (time.perf_counter() - t0) * 1000
            for i in range(L):
                run(i)
            times = []
            for _ in range(args.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(L):
                    run(i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000 / L)
            entry[name] = {"us": round(statistics.median(times), 1), "first_ms": round(first_ms, 1),
                           "spread_us": round(max(times) - min(times), 1), "config": cfg}
        results["tokens"][M] = entry
        e = entry
        plugin_unfused = (e["routed64:table"]["us"] + e["shared:dense"]["us"]) if "routed64:table" in e else None
        rows.append((M, e["fused66:table"]["us"] if "fused66:table" in e else None, e["fused66:default"]["us"],
                     e["routed64:vllm"]["us"], e["routed64:table"]["us"] if "routed64:table" in e else None,
                     e["shared:dense"]["us"], e["intree"]["us"], plugin_unfused,
                     {k: v["first_ms"] for k, v in e.items()}))
        print(f"M={M}: " + json.dumps(entry), flush=True)
        del x, ids6, w6, ids8, w8
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("| M | fused66 table | fused66 default | routed64 (vLLM's pick) | routed64 plugin table | shared dense | in-tree (routed+shared) | plugin-unfused (routed64 table + shared) | fused66:table ÷ in-tree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for M, f66t, f66d, r64d, r64t, sh, it, pu, _ in rows:
        ratio = f"{f66t / it:.3f}" if f66t else ""
        print(f"| {M} | {f66t} | {f66d} | {r64d} | {r64t} | {sh} | {it} | {pu} | {ratio} |")
    print("first call (ms, includes the Triton compile):")
    for M, *_, first in rows:
        print(f"  M={M}: {first}")


if __name__ == "__main__":
    main()
