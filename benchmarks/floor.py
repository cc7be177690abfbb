#!/usr/bin/env python
"""The floor: the extractor's convolutions alone, forward and backward to the input, at the shapes they have in
the network, in both memory layouts (the faster counts): what no implementation of this loss can go below
without changing the arithmetic.

    python benchmarks/floor.py --size 512 --repeats 5 [--precision bf16-mixed]
"""

from __future__ import annotations

import copy

import common
from common import Clock, median

# The dtype the convolutions run in under each precision (autocast's choice for conv2d).
CONV_DTYPES = {"32-true": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}


class Floor:
    """The extractor's convolutions alone: forward and backward to the input, at their real shapes,
    in the dtype that ``precision`` runs them in (bfloat16 under bf16-mixed, as autocast would)."""

    def __init__(self, extractor, height: int, width: int, device: str, precision: str = "32-true") -> None:
        import torch
        from torch import nn

        if precision == "16-mixed" and not device.startswith("cuda"):
            precision = "bf16-mixed"  # as Lightning runs it on a CPU
        self.dtype = dtype = getattr(torch, CONV_DTYPES.get(precision, "float32"))
        self.gflop = 0.0
        shapes = []
        # The shapes come from a copy of the network on the meta device (no arithmetic, no memory), and the
        # weights are moved to ``device`` below: the extractor may be anywhere (after a fit, Lightning has
        # moved the project's module back to the CPU, while ``device`` may be cuda).
        body = copy.deepcopy(extractor.body).to("meta")
        with torch.no_grad():
            x = torch.zeros(1, 3, height, width, device="meta")
            for layer, meta_layer in zip(extractor.body, body, strict=True):
                if isinstance(layer, nn.Conv2d):
                    y = meta_layer(x)
                    shapes.append((layer, tuple(x.shape)))
                    # forward + backward to the input: 2 * (2 * Cin * 9 * Cout * H * W)
                    self.gflop += 4 * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * y.numel() / 1e9
                    x = y
                else:
                    x = meta_layer(x)
        self.layouts = {}
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            convs = []
            for layer, shape in shapes:
                inp = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                weight = layer.weight.detach().to(device=device, dtype=dtype).contiguous(memory_format=fmt)
                bias = layer.bias.detach().to(device=device, dtype=dtype)
                out = torch.nn.functional.conv2d(inp, weight, bias, layer.stride, layer.padding, layer.dilation)
                grad = torch.randn_like(out)
                convs.append((inp, weight, bias, grad, layer))
            self.layouts[name] = convs
        self.clocks = {name: Clock(device) for name in self.layouts}

    def _once(self, convs) -> None:
        import torch

        for inp, weight, bias, grad, layer in convs:
            torch.nn.functional.conv2d(inp, weight, bias, layer.stride, layer.padding, layer.dilation)
            torch.ops.aten.convolution_backward(
                grad,
                inp,
                weight,
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
                False,
                [0, 0],
                1,
                [True, False, False],
            )

    def run(self, steps: int, record: bool = True) -> None:
        for name, convs in self.layouts.items():
            for _ in range(steps):
                self.clocks[name].start()
                self._once(convs)
                self.clocks[name].stop(record)

    def best(self) -> str:
        """The faster layout."""
        return min(self.clocks, key=lambda k: median(self.clocks[k].times))


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--size", type=int, default=512, help="longest side of the content image (default 512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each layout (default 5)")
    parser.add_argument("--precision", default="32-true", help="the dtype its convolutions run in (default 32-true)")
    args = parser.parse_args(argv)
    torch, _ = common.setup_torch(args.threads, args.device)
    from nst_lightning import names
    from nst_lightning.core.features import FeatureExtractor
    from nst_lightning.run.data import StyleTransferDataModule

    width, height = StyleTransferDataModule(str(common.CONTENT), str(common.STYLE), args.size).content_size()
    extractor = FeatureExtractor([*names.CONTENT_LAYERS, *names.STYLE_LAYERS], weights="random").to(args.device)
    floor = Floor(extractor, height, width, args.device, args.precision)
    floor.run(1, record=False)
    floor.run(args.repeats)
    for name, clock in floor.clocks.items():
        seconds = median(clock.times)
        print(f"{width}x{height} {name} {floor.dtype}: {seconds:.3f} s, {floor.gflop / seconds:.0f} GFLOP/s")
    print(f"faster layout: {floor.best()} ({floor.gflop:.0f} GFLOP per iteration)")


if __name__ == "__main__":
    main()
