"""The base's routed experts in inference: the padded layout (one torch.bmm) against the jagged one (torch._grouped_mm).

    python bench/expert_layouts.py --threads 2
    python bench/expert_layouts.py --threads 1

For the two bench/serve.py models (16 experts top-2, hidden 512, expert width 768; 64 experts top-8, width 192; one
layer, NF4 with the experts quantized), times one StudioExperts forward under torch.no_grad() for decode-sized and
prefill-sized routings (12 and 32 rows, 96, 384 and 1024 tokens) with the layout forced each way, alternating, in
one process. Prints the times, the layout `Routing`'s automatic rule picks for inference and whether it is the
faster one (or within 10% of it). On the CPU torch._grouped_mm is a loop of one matmul per group: with several
torch threads every one of them pays an OpenMP fork and join, which one bmm pays once. This is the measurement
behind CPU_INFERENCE_PADDED_MAX_CAP and CPU_INFERENCE_MAX_PADDING_WASTE in studio/moe/grouped.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

MODELS = [("16 experts top-2", 16, 2, 768), ("64 experts top-8", 64, 8, 192)]  # label, experts, top_k, width
TOKENS = (12, 32, 96, 384, 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--calls", type=int, default=20, help="timed forwards per layout and shape (a quarter of it "
                                                         "from 384 tokens on)")
    args = p.parse_args(argv)
    import torch

    from bench.train_step import build_model_dir
    from studio.models.loading import QuantSpec, load_base
    from studio.moe import grouped
    from studio.moe.experts import StudioExperts

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch threads; one StudioExperts forward under no_grad, median ms")
    print(f"{'model':<18}{'tokens':>7}{'cap':>5}{'waste':>7}{'padded ms':>11}{'jagged ms':>11}{'picks':>8}"
          f"{'faster':>8}")
    wrong = total = 0
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-layouts-") as tmp:
        for label, experts, top_k, width in MODELS:
            ns = argparse.Namespace(hidden=512, head_dim=64, heads=0, kv_heads=0, layers=1, experts=experts,
                                    top_k=top_k, moe_intermediate=width, seq_len=512, seed=0, batch_size=1)
            build_model_dir(ns, Path(tmp) / label.replace(" ", "-"))
            model = load_base(str(Path(tmp) / label.replace(" ", "-")), QuantSpec("4bit"), "cpu").model
            module = next(m for m in model.modules() if isinstance(m, StudioExperts))
            for tokens in TOKENS:
                x = torch.randn(tokens, 512, generator=g)
                index = torch.rand(tokens, experts, generator=g).topk(top_k, -1).indices
                weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1)
                calls = args.calls if tokens < 384 else max(2, args.calls // 4)
                times: dict[str, list[float]] = {"padded": [], "jagged": []}
                with torch.no_grad():
                    picks = grouped.Routing(index, experts).layout
                    for _ in range(2):  # warm both
                        for layout in times:
                            module.grouped_layout = layout
                            module(x, index, weights)
                    for i in range(calls):  # alternating: a slow spell of the machine falls on both
                        for layout in (("padded", "jagged") if i % 2 else ("jagged", "padded")):
                            module.grouped_layout = layout
                            t0 = time.perf_counter()
                            module(x, index, weights)
                            times[layout].append(time.perf_counter() - t0)
                module.grouped_layout = "auto"
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                jagged = grouped.Routing(index, experts, "jagged")
                waste = jagged.groups * jagged.cap / jagged.rows
                faster = min(ms, key=ms.get)
                ok = picks == faster or ms[picks] <= 1.1 * ms[faster]  # within 10%: a tie
                wrong += not ok
                total += 1
                print(f"{label:<18}{tokens:>7}{jagged.cap:>5}{waste:>7.2f}{ms['padded']:>11.2f}{ms['jagged']:>11.2f}"
                      f"{picks:>8}{'yes' if ok else 'NO':>8}")
            del model, module
    print(f"the inference rule picked the faster layout (or one within 10% of it) for {total - wrong} of {total} "
          f"shapes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
