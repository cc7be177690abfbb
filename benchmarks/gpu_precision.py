#!/usr/bin/env python
"""Mixed precision on a GPU: iterations per second at 32-true, bf16-mixed and 16-mixed at each size, and the final
loss after the same number of iterations from the same start, against 32-true (CUDA only).

    python benchmarks/gpu_precision.py --device cuda --gpu-sizes 512 1024 --gpu-steps 50
"""

from __future__ import annotations

import json
import sys

import common
from common import MIB, Project, median


def precision_section(device: str, sizes: list[int], precisions: list[str], steps: int) -> dict:
    """CUDA only: iterations per second at each precision and size, and the final loss after ``steps``
    iterations against 32-true from the same start."""
    if not device.startswith("cuda"):
        return {"status": "skipped: no CUDA device in this run (GPU figures not yet measured)"}
    from nst_lightning.run.memory import estimate_peak

    torch = sys.modules["torch"]
    rows = []
    for size in sizes:
        finals = {}
        for precision in precisions:
            torch.cuda.reset_peak_memory_stats()
            # float32_final_steps=0: the precision's own iterations and loss, without the float32 finish.
            project = Project(size, device, precision, compile=False, float32_final_steps=0)
            project.fit(1, record=False)  # setup and warm-up
            times = project.fit(steps)
            with torch.no_grad():
                final = float(project.module(project.module.image)["total"])
            finals[precision] = final
            step = median(times)
            height, width = project.shape
            estimate = estimate_peak(height, width, precision=precision, weights="random", device="cuda")
            rows.append(
                {
                    "size": size,
                    "shape": list(project.shape),
                    "precision": precision,
                    "s_per_iter": step,
                    "iter_per_s": 1 / step,
                    "final_loss": final,
                    "steps": 1 + steps,
                    "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                    "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / MIB,
                    "estimate_mib": estimate.total / MIB,
                }
            )
            print(f"  [{size} px] {precision}: {1 / step:.2f} it/s, final loss {final:.4g}", flush=True)
        for row in rows:
            if row["size"] == size and "32-true" in finals:
                row["final_loss_vs_32_true"] = row["final_loss"] / finals["32-true"] - 1
    return {"rows": rows}


def report(section: dict) -> list[str]:
    if "rows" not in section:
        return [f"Mixed precision: {section['status']}"]
    lines = [
        "| size | precision | it/s | final loss | vs 32-true | max allocated | max reserved | estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in section["rows"]:
        lines.append(
            f"| {row['size']} | {row['precision']} | {row['iter_per_s']:.2f} | {row['final_loss']:.5g} "
            f"| {row.get('final_loss_vs_32_true', float('nan')):+.2%} | {row['max_memory_allocated_mib']:.0f} MiB "
            f"| {row['max_memory_reserved_mib']:.0f} MiB | {row['estimate_mib']:.0f} MiB |"
        )
    return lines


def add_arguments(parser) -> None:
    parser.add_argument(
        "--precisions", nargs="+", default=["32-true", "bf16-mixed", "16-mixed"], help="precisions compared (CUDA)"
    )
    parser.add_argument("--gpu-sizes", type=int, nargs="+", default=[512, 1024], help="sizes compared (CUDA)")
    parser.add_argument("--gpu-steps", type=int, default=50, help="steps for the final-loss agreement (CUDA)")


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    common.setup_torch(args.threads, args.device)
    section = precision_section(args.device, args.gpu_sizes, args.precisions, args.gpu_steps)
    print("\n".join(report(section)))
    if args.json:
        args.json.write_text(json.dumps(section, indent=2))


if __name__ == "__main__":
    main()
