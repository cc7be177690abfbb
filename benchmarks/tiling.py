#!/usr/bin/env python
"""Tiled against whole evaluation of the objective, in one run: the loss curve of the same L-BFGS run (the
project's settings: history 50, DeviceLBFGS or strong Wolfe, one iteration a step; a whole run from a start
perturbed by 1e-6 gives the spread of the whole run itself) evaluated whole, over tiles with the exact
halo, and over tiles with smaller halos; one evaluation at the start, tiled against whole (loss and gradient,
float32 and under bf16 autocast); and the time of one evaluation, tiled against whole, interleaved.

    python benchmarks/tiling.py --size 512 --tile 256 --steps 50 [--splits none pool2 pool3] [--weights FILE]

"Through pool2": the layers through pool2 over tiles, the rest over the whole image (core/tiling.py); "none": every
layer over tiles. The cost the memory plan predicts (core/tiling.py: relative_cost) is printed beside each timing.

Prints one table; --json keeps the curves.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

import common
from common import REPO, median

DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_imagenet_keras.pth"


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--size", type=int, default=512, help="longest side of the image (default 512)")
    parser.add_argument("--tile", type=int, default=256, help="tile core size in pixels (default 256)")
    parser.add_argument("--steps", type=int, default=50, help="L-BFGS iterations of each curve (default 50)")
    parser.add_argument("--halos", type=int, nargs="*", default=[32, 0], help="smaller halos to try (pixels)")
    parser.add_argument("--timing-repeats", type=int, default=5, help="interleaved evaluations timed (default 5)")
    parser.add_argument(
        "--line-search",
        default="backtrack",
        choices=["backtrack", "strong_wolfe"],
        help="backtrack: DeviceLBFGS, the default; strong_wolfe: torch's L-BFGS (default backtrack)",
    )
    parser.add_argument("--history", type=int, default=50, help="L-BFGS history (default 50)")
    parser.add_argument("--timing-tiles", type=int, nargs="*", default=[], help="more tile sizes to time (pixels)")
    parser.add_argument(
        "--splits",
        nargs="*",
        default=["none", "pool2", "pool3"],
        help="the last layer over the tiles, each compared (none: every layer; default none pool2 pool3)",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=1e-6,
        help="the spread of the whole run itself: a whole run from the start plus noise of this size",
    )
    parser.add_argument(
        "--agreement",
        nargs="*",
        default=["32-true", "bf16-mixed"],
        choices=["32-true", "bf16-mixed"],
        help="precisions of the one-evaluation agreement at the start (default both)",
    )
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="VGG-16 weights file (default: the shared)")
    args = parser.parse_args()
    torch, threads = common.setup_torch(args.threads, args.device)

    from nst_lightning.core.lbfgs import DeviceLBFGS, make_lbfgs
    from nst_lightning.core.tiles import Tiling, exact_halo, layer_reach, relative_cost, tiled_layers
    from nst_lightning.core.tiling import evaluate_tiled

    objective, start = common.sample_objective(args.weights, args.size, args.device)
    extractor, layers = objective.extractor, list(objective.extractor.layers)
    splits = [None if split == "none" else split for split in args.splits]
    exact = {
        split: exact_halo(layer_reach(extractor.body), tiled_layers(extractor.body, layers, split)) for split in splits
    }
    sync = common.sync_fn(args.device)

    def evaluate(image, tiling, halo, context=nullcontext):
        if tiling is None:
            with context():
                losses = objective(image)
            losses["total"].backward()
            return losses
        return evaluate_tiled(objective, image, tiling, lambda t: t.backward(), halo=halo, context=context)

    def curve(tiling, halo, noise=0.0) -> list[float]:
        generator = torch.Generator().manual_seed(0)
        image = torch.nn.Parameter(start + noise * torch.randn(start.shape, generator=generator).to(start.device))
        optimizer = make_lbfgs(image, 1.0, args.history, args.line_search)
        losses: list[float] = []

        def closure():
            optimizer.zero_grad()
            return evaluate(image, tiling, halo)["total"].detach()

        for _ in range(args.steps):  # the loss where each step starts (DeviceLBFGS: its last accepted point)
            loss = optimizer.step(closure)
            losses.append(float(optimizer.accepted_loss() if isinstance(optimizer, DeviceLBFGS) else loss))
        return losses

    def named(split):
        return "all layers" if split is None else f"through {split}"

    exact_tilings = [
        (f"tiled {named(split)}, halo {exact[split]} (exact)", Tiling(args.tile, split)) for split in splits
    ]
    variants = [("whole", None, None, 0.0)] + [(name, tiling, None, 0.0) for name, tiling in exact_tilings]
    if args.noise:
        variants.insert(1, (f"whole, start + {args.noise:g} noise", None, None, args.noise))
    variants += [(f"tiled, halo {h}", Tiling(args.tile), h, 0.0) for h in args.halos if h != exact.get(None)]
    curves = {name: curve(tiling, halo, noise) for name, tiling, halo, noise in variants} if args.steps else {}

    compared = [(named(split), Tiling(args.tile, split), None) for split in splits]
    compared += [(f"all layers, halo {h}", Tiling(args.tile), h) for h in args.halos]
    agreement = start_agreement(torch, evaluate, start, args.agreement, compared)

    # Time per evaluation, whole and exact-tiled in turn on the same image.
    image = torch.nn.Parameter(start.clone())
    sides = dict.fromkeys([args.tile, *args.timing_tiles])
    timed = [("whole", None)] + [(f"{t} px, {named(s)}", Tiling(t, s)) for t in sides for s in splits]
    times: dict[str, list[float]] = {name: [] for name, _ in timed}
    for _ in range(args.timing_repeats):
        for name, tiling in timed:
            image.grad = None
            sync()
            began = time.perf_counter()
            evaluate(image, tiling, None)
            sync()
            times[name].append(time.perf_counter() - began)

    height, width = start.shape[-2:]
    print(f"{width}x{height} px, tiles of {args.tile} px, {args.steps} L-BFGS iterations, {threads} threads")
    if curves:
        whole = curves["whole"]
        print(f"{'variant':<32} {'final loss':>12} {'vs whole':>9} {'worst step':>11}")
        for name, losses in curves.items():
            worst = max(abs(a / b - 1) for a, b in zip(losses, whole, strict=True))
            print(f"{name:<32} {losses[-1]:>12.5g} {losses[-1] / whole[-1] - 1:>+9.2%} {worst:>11.2%}")
    if agreement:
        print(f"{'start, one evaluation':<40} {'loss vs whole':>14} {'gradient: max error / max':>26}")
        for precision, name, loss_error, grad_error in agreement:
            print(f"{precision + ', tiled, ' + name:<40} {loss_error:>+14.1e} {grad_error:>26.1e}")
    if args.timing_repeats:
        print_times(times, [(name, relative_cost(extractor, height, width, tiling)) for name, tiling in timed[1:]])
    if args.json:
        record = {
            "curves": curves,
            "times": times,
            "halo": {str(k): v for k, v in exact.items()},
            "agreement": agreement,
        }
        args.json.write_text(json.dumps(record, indent=1))


def print_times(times: dict[str, list[float]], predictions: list[tuple[str, float]]) -> None:
    """The median time of one evaluation, whole and each tiling's, with its ratio and the predicted one."""
    print(f"{'one evaluation':<32} {'seconds':>8} {'vs whole':>9} {'predicted':>10}")
    print(f"{'whole':<32} {median(times['whole']):>8.3f}")
    for name, predicted in predictions:
        ratio = median(times[name]) / median(times["whole"])
        print(f"{'tiles of ' + name:<32} {median(times[name]):>8.3f} {ratio:>8.2f}x {predicted:>9.2f}x")


def start_agreement(torch, evaluate, start, precisions, compared) -> list[tuple[str, str, float, float]]:
    """One evaluation at the start, tiled (each of ``compared``: name, tiling, halo) against whole: the loss's
    relative difference and the gradient's largest difference over its largest value, float32 and under bf16
    autocast."""
    rows = []
    for precision in precisions:
        dtype = {"32-true": None, "bf16-mixed": torch.bfloat16}[precision]
        context = (lambda d=dtype: torch.autocast(start.device.type, dtype=d)) if dtype else nullcontext
        results = {}
        for name, tiling, halo in [("whole", None, None), *compared]:
            image = torch.nn.Parameter(start.clone())
            loss = float(evaluate(image, tiling, halo, context)["total"])
            results[name] = (loss, image.grad.detach().clone())
        loss, grad = results.pop("whole")
        for name, (other, other_grad) in results.items():
            error = float((other_grad - grad).abs().max() / grad.abs().max())
            rows.append((precision, name, other / loss - 1, error))
    return rows


if __name__ == "__main__":
    main()
