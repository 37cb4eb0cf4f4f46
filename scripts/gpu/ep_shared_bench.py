"""One EP rank's MoE work with the shared experts fused into the routed call or beside it
(CUDA, vLLM installed; one GPU stands in for rank 0 of a 2-GPU TP=2 + EP layer).

Under ``--tensor-parallel-size 2 --enable-expert-parallel`` every rank sees all ``M`` tokens and
holds half the routed experts. The two ways to run the 21B-A3B's shared FFN (intermediate
3,072) there:

* **beside** (the plugin's EP default; vLLM's in-tree model): the routed call over 32 local
  experts (table ``E=32``) plus the shared MLP tensor-parallel (1,536 columns per rank) --
  on vLLM's auxiliary stream for ``M <= 256`` tokens
  (``VLLM_SHARED_EXPERTS_STREAM_TOKEN_THRESHOLD``), after it above;
* **fused** (``VLLM_ERNIE45_FUSE_SHARED_EXPERTS=1``): one routed call over 33 local slots,
  the 33rd one shared slice of 1,536 that every token selects (``vllm_ernie45.expert_layout``;
  table ``E=33``).

Both are timed the tuner's way (CUDA graphs up to 512 tokens, ``--layers`` distinct weight
sets, median of ``--reps``), each with the tables the plugin ships (``tables`` column: found
or vLLM's default). Run it several times (``--repeat``) to see the spread. It measures the
per-rank kernels only; the all-reduce after them is the same in both.

    python scripts/gpu/ep_shared_bench.py --out $OUT/ep_shared.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tune_moe import Problem, expert_weights, fused_shared_slots, run_fused, time_us  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]


class SharedMLP:
    """The shared FFN's tensor-parallel share on one rank: gate/up ``2N x H``, down ``H x N``."""

    def __init__(self, H: int, N: int, layers: int, seed: int = 5):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.gate_up = [expert_weights(1, 2 * N, H, gen, "bf16")[0][0] for _ in range(layers)]
        self.down = [expert_weights(1, H, N, gen, "bf16")[0][0] for _ in range(layers)]
        self.N = N

    def __call__(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        gate_up = torch.nn.functional.linear(x, self.gate_up[layer])
        act = torch.empty(x.shape[0], self.N, dtype=x.dtype, device=x.device)
        torch.ops._C.silu_and_mul(act, gate_up)
        return torch.nn.functional.linear(act, self.down[layer])


def beside(routed: Problem, shared: SharedMLP, layer: int, stream_threshold: int, aux: torch.cuda.Stream):
    """vLLM's order for shared experts given to the fused-MoE layer: an auxiliary stream
    while the routed call runs (small batches), else one after the other; then the sum."""
    x = routed.x
    if x.shape[0] <= stream_threshold:
        aux.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(aux):
            shared_out = shared(x, layer)
        out = run_fused(routed, layer, None)
        torch.cuda.current_stream().wait_stream(aux)
    else:
        shared_out = shared(x, layer)
        out = run_fused(routed, layer, None)
    return out + shared_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2560)
    ap.add_argument("--inter", type=int, default=1536, help="moe_intermediate_size")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--shared", type=int, default=2, help="shared experts (slices of --inter)")
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stream-threshold", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from vllm_ernie45 import envs

    envs.use_tuned_moe_configs()  # the plugin's shipped tables, as in the model
    from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name

    E, S, k, H, N, ep = args.experts, args.shared, args.top_k, args.hidden, args.inter, args.ep
    if fused_shared_slots(E + S) != S:
        raise SystemExit(f"the tuner's problems model 64 routed + 2 shared experts, not {E} + {S}")
    routed = Problem(E, k, H, N, 1, args.layers, ep=ep)
    fused = Problem(E + S, k + S, H, N, 1, args.layers, ep=ep)
    shared = SharedMLP(H, N * S // ep, args.layers)
    aux = torch.cuda.Stream()
    folder = envs.MOE_CONFIG_FOLDER
    tables = {
        name: (folder / name).exists()
        for name in (get_config_file_name(E // ep, N, None), get_config_file_name((E + S) // ep, N, None))
    }
    print(f"GPU {torch.cuda.get_device_name()}; EP={ep} rank 0; shipped tables: {tables}", flush=True)
    rows = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        routed.resize(tokens)
        fused.resize(tokens)
        fused.x = routed.x
        b, f = [], []
        for _ in range(args.repeat):
            b.append(time_us(lambda i: beside(routed, shared, i, args.stream_threshold, aux), args.layers, args.reps, tokens))
            f.append(time_us(lambda i: run_fused(fused, i, None), args.layers, args.reps, tokens))
        row = {
            "tokens": tokens,
            "beside_us": [round(t, 1) for t in b],
            "fused_us": [round(t, 1) for t in f],
            "fused_over_beside": round(statistics.median(f) / statistics.median(b), 3),
        }
        rows.append(row)
        print(f"M={tokens:5d}  beside {statistics.median(b):8.1f} us {row['beside_us']}  fused "
              f"{statistics.median(f):8.1f} us {row['fused_us']}  fused/beside {row['fused_over_beside']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "ep": ep, "shapes": {"E": E, "S": S, "top_k": k, "H": H, "N": N},
         "tables": tables, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
