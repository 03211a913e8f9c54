"""Expert slot LoRA per call: the padded grid of the hit experts, the grouped products, two references.

    python bench/expert_lora_paths.py --threads 2
    python bench/expert_lora_paths.py --threads 1 --cold

For decode-sized and prefill-sized routings of the bench/serve.py models (16 experts top-2 with hidden 512 and
expert width 768; 64 experts top-8 with width 192; 12 and 32 decode rows, prefills of 96 and 384 tokens) in the
jagged layout (the one where the choice matters: padded routing is the hit-expert grid already), times one
projection's expert LoRA (rank 16) in one process three ways: studio.lora.layers._expert_lora on the grid of the hit
experts (their factors gathered) and on grouped products (torch._grouped_mm), and, for reference, two designs the
studio ran before: a grid of all experts that uses the factors in place (no gather), and the hit experts' grid on
factors stored untransposed (A [E, r, in], B [E, out, r], read as transposed operands). Prints the times, the path
`_grid_pays` picks and whether it is the faster of the first two. --cold streams 64 MiB through the cache before
every call, as the base's dequantized expert weights do between LoRA calls in a real forward. This is the measurement
behind GRID_MAX_CAP, GRID_MAX_CAP_ONE_THREAD, GRID_MACS_PER_GROUP and the padded-routing rule in
studio/lora/layers.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

# (label, experts, top_k, tokens, (hidden, expert width)): the two bench/serve.py models, decode and prefill
CASES = [(f"{e} experts, {t} tokens", e, k, t, shape) for e, k, shape in ((16, 2, (512, 768)), (64, 8, (512, 192)))
         for t in (12, 32, 96, 384)]  # 12 and 32 decode rows (a batch, 32 streams), then 12 prompts of 8 and 32 tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--calls", type=int, default=200, help="timed calls per path and shape")
    p.add_argument("--cold", action="store_true", help="evict the caches before every call")
    args = p.parse_args(argv)
    import torch

    from studio.lora import layers
    from studio.moe.grouped import Routing

    if args.threads:
        torch.set_num_threads(args.threads)

    def all_experts_grid(routing, x, a, b):  # a reference: every expert in the grid, factors used in place
        e, cap = a.shape[0], routing.cap
        idx = routing.hit[routing.group_of_row] * cap + routing.rank_in_group()
        grid = x.new_zeros(e * cap, x.shape[-1]).index_copy_(0, idx, x)
        d = torch.bmm(torch.bmm(grid.view(e, cap, -1), a), b)
        return d.view(e * cap, -1).index_select(0, idx)

    def untransposed_grid(routing, x, a_t, b_t):  # a reference: the hit experts' grid, A [E, r, in], B [E, out, r]
        a, b = routing.select(a_t), routing.select(b_t)
        grid = x.index_select(0, routing.grid_rows()).view(routing.groups, routing.cap, -1)
        d = torch.bmm(torch.bmm(grid, a.transpose(1, 2)), b.transpose(1, 2))
        return d.view(routing.groups * routing.cap, -1).index_select(0, routing.grid_index())
    flush = torch.empty(16 * 2 ** 20) if args.cold else None  # 64 MiB of float32

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        times = []
        for _ in range(args.calls):
            if flush is not None:
                flush.add_(1.0)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} torch threads, r={args.r}, {'cold' if args.cold else 'warm'} caches, "
          f"median of {args.calls} calls")
    print(f"{'routing':<22}{'projection':>11}{'hit/all':>9}{'cap':>5}{'grid us':>9}{'grouped us':>12}"
          f"{'all-experts grid us':>21}{'untransposed grid us':>22}{'picks':>9}{'faster':>8}")
    wrong = 0
    for label, experts, top_k, tokens, (hidden, width) in CASES:
        top_k_index = torch.rand(tokens, experts, generator=g).topk(top_k, -1).indices
        routing = Routing(top_k_index, experts, "jagged")
        for name, fan_in, fan_out in (("gate_up", hidden, 2 * width), ("down", width, hidden)):
            a = torch.randn(experts, fan_in, args.r, generator=g) * 0.01  # the slot layout: A^T, B^T
            b = torch.randn(experts, args.r, fan_out, generator=g) * 0.01
            a_t, b_t = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
            x = routing.to_layout(torch.randn(routing.rows, fan_in, generator=g))
            results = {}
            for path, pays in (("grid", True), ("grouped", False)):
                original = layers._grid_pays
                layers._grid_pays = lambda *_, pays=pays: pays
                try:
                    results[path] = timed(lambda: layers._expert_lora(routing, x, a, b))
                finally:
                    layers._grid_pays = original
            results["all"] = timed(lambda: all_experts_grid(routing, x, a, b))
            results["untransposed"] = timed(lambda: untransposed_grid(routing, x, a_t, b_t))
            picks = "grid" if layers._grid_pays(routing, routing.select(a), routing.select(b)) else "grouped"
            faster = min(("grid", "grouped"), key=results.get)
            # within 10% either way counts as a tie: the rule need not split hairs
            ok = picks == faster or results[picks] <= 1.1 * results[faster]
            wrong += not ok
            print(f"{label:<22}{name:>11}{f'{routing.groups}/{experts}':>9}{routing.cap:>5}{results['grid']:>9.0f}"
                  f"{results['grouped']:>12.0f}{results['all']:>21.0f}{results['untransposed']:>22.0f}{picks:>9}"
                  f"{'yes' if ok else 'NO':>8}")
    print(f"_grid_pays picked the faster path (or one within 10% of it) for {len(CASES) * 2 - wrong} of "
          f"{len(CASES) * 2} shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
