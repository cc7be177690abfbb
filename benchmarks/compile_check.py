#!/usr/bin/env python
"""Does ``model.compile`` give the eager gradient under bf16-mixed on this device? The objective's loss and
gradient at the content image (where a run starts), eager and compiled, both under bf16 autocast with the
backward pass inside it, as a run's closure has them. On a GPU the combination is refused
(``checks.check_precision``: measured broken, cause unknown); where this check agrees, the refusal can go.

    python benchmarks/compile_check.py --device cuda --weights ../shared/weights/vgg16_imagenet_keras.pth
"""

from __future__ import annotations

import common
from common import CONTENT, STYLE


def compile_check(device: str, backbone: str = "vgg16", weights: str = "random", size: int = 128) -> str:
    """One line: eager and compiled loss, the gradients' cosine and relative difference, a verdict."""
    import torch

    from nst_lightning import StyleTransfer, StyleTransferDataModule

    module = StyleTransfer(backbone=backbone, weights=weights)
    data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size)
    module.objective.extractor.to(device)
    with torch.no_grad():
        module.set_targets(data.inputs(), device)
    objective = module.objective.to(device)

    def loss_and_grad(fn) -> tuple[float, torch.Tensor]:
        image = data.content_image.to(device).clone().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            total = fn(image)["total"]
            total.backward()
        return float(total), image.grad.detach().float().flatten()

    eager_loss, eager = loss_and_grad(objective)
    compiled_loss, compiled = loss_and_grad(torch.compile(objective))
    cosine = float(torch.nn.functional.cosine_similarity(eager, compiled, dim=0))
    difference = float((compiled - eager).norm() / eager.norm().clamp_min(1e-30))
    verdict = "agree" if cosine > 0.99 and abs(compiled_loss / eager_loss - 1) < 1e-2 else "DISAGREE"
    return (
        f"compile + bf16-mixed on {device} ({size} px, {backbone}): loss eager {eager_loss:.6g}, compiled "
        f"{compiled_loss:.6g}; gradient cosine {cosine:.4f}, relative difference {difference:.2e}: {verdict}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--weights", default="random", help="the network's weights (default random)")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=128, help="longest side (default 128)")
    args = parser.parse_args(argv)
    common.setup_torch(args.threads, args.device)
    print(compile_check(args.device, args.backbone, args.weights, args.size))


if __name__ == "__main__":
    main()
