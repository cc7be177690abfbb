#!/usr/bin/env python
"""The largest image the memory plan (nst_lightning/run/plan.py) accepts, with tiles forbidden
(model.tile_size 0) and allowed (the default), in a given amount of memory; and what the plan decides
(tiles, the layers over them, L-BFGS history, the predicted cost per evaluation) at the sizes asked for.
Estimates only: nothing is allocated, so it takes seconds whatever the sizes.

    python benchmarks/print_sizes.py [--available GIB ...] [--ulimit-kib 12000000] [--sizes 3000 ...]

Defaults: the memory this machine has available now, VGG-16 (the shared weights' network), the sample pair
(Tübingen, 4:3, and Starry Night at the same size), float32 (a run's float32 finish, model.float32_final_steps,
needs the float32 footprint, so the plan sizes a print run for it), L-BFGS history 50 (halved by the plan down
to 5 where the memory holds no more). Prints one table.
"""

from __future__ import annotations

import json
import resource

import common
from common import CONTENT, STYLE

GIB = 2**30


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--available", type=float, nargs="*", default=None, help="memory budgets in GiB")
    parser.add_argument(
        "--ulimit-kib",
        type=int,
        nargs="*",
        default=[],
        help="also what a run sees under `ulimit -v` of this many KiB (the limit less this process's address space)",
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[3000], help="longest sides whose plan is shown")
    parser.add_argument("--precision", default="32-true", help="the precision the plan sizes for (default 32-true)")
    parser.add_argument("--backbone", default="vgg16", help="the network (default vgg16)")
    args = parser.parse_args()
    common.setup_torch(1, "cpu")

    from nst_lightning import StyleTransfer, StyleTransferDataModule
    from nst_lightning.core.tiles import relative_cost
    from nst_lightning.errors import ConfigError
    from nst_lightning.run import runtime
    from nst_lightning.run.plan import plan_run

    budgets: list[tuple[str, int]] = []
    for gib in args.available if args.available is not None else []:
        budgets.append((f"{gib:g} GiB", int(gib * GIB)))
    if args.available is None:
        free = runtime.available_bytes("cpu")
        budgets.append((f"available now ({free / GIB:.1f} GiB)", free))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    for kib in args.ulimit_kib:
        resource.setrlimit(resource.RLIMIT_AS, (kib * 1024, hard))
        try:
            free = runtime.available_bytes("cpu")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        budgets.append((f"ulimit -v {kib} ({free / GIB:.1f} GiB)", free))

    modules = {
        name: StyleTransfer(weights="random", backbone=args.backbone, tile_size=tile)
        for name, tile in (("whole (tile_size 0)", 0), ("tiled (default)", None))
    }

    def plan(module, side: int, free: int):
        data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=side)
        extractor, settings = module.objective.extractor, module.hparams
        estimate, tiles, history = plan_run(data, [side], extractor, settings, args.precision, "cpu", available=free)
        tiling = tiles[-1]
        cost = relative_cost(extractor, *reversed(data.content_size(side)), tiling)  # (height, width)
        return estimate, (str(tiling) if tiling else None), history, cost

    def largest(module, free: int) -> int:
        """The largest longest side (a multiple of 16) whose plan fits in ``free`` bytes, by bisection."""
        low, high = 0, 2048  # 16 * k px; 32768 px is beyond any budget here
        while high - low > 1:
            middle = (low + high) // 2
            try:
                plan(module, 16 * middle, free)
                low = middle
            except ConfigError:
                high = middle
        return 16 * low

    rows = []
    print(f"{args.backbone}, {args.precision}, the sample pair (content 4:3, the style at the same size)")
    print()
    print(
        "| memory | largest side, tiles forbidden | largest side, tiled | pixels, tiled/whole | tiles, history, cost |"
    )
    print("|---|---|---|---|---|")
    for label, free in budgets:
        whole, tiled = (largest(module, free) for module in modules.values())
        _, tile, history, cost = plan(modules["tiled (default)"], tiled, free)
        _, _, whole_history, _ = plan(modules["whole (tile_size 0)"], whole, free)
        ratio = f"{tiled**2 / whole**2:.1f}x" if whole else "-"
        plan_text = f"{tile}, {history}, {cost:.2f}x"
        print(f"| {label} | {whole} px (history {whole_history}) | {tiled} px | {ratio} | {plan_text} |")
        rows.append({"memory": label, "bytes": free, "whole": whole, "tiled": tiled, "tile": tile, "history": history})
    print()
    print("| memory | size | tiles forbidden: needs | tiled: needs | tiles | L-BFGS history | cost |")
    print("|---|---|---|---|---|---|---|")
    for label, free in budgets:
        for side in args.sizes:
            found = []
            for module in modules.values():
                try:
                    estimate, tile, history, cost = plan(module, side, free)
                    found.append((f"{(estimate.total - estimate.runtime) / GIB:.1f} GiB", tile, history, cost))
                except ConfigError:
                    found.append(("refused", None, None, None))
            (whole, _, _, _), (need, tile, history, cost) = found
            cost = f"{cost:.2f}x" if cost else "-"
            print(f"| {label} | {side} px | {whole} | {need} | {tile or 'none'} | {history} | {cost} |")
            rows.append({"memory": label, "size": side, "whole": whole, "need": need, "tile": tile, "history": history})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
