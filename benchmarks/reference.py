#!/usr/bin/env python
"""A plain, tutorial-style Gatys implementation: the benchmark's yardstick.

Written after the PyTorch neural-style tutorial (``get_style_model_and_losses``): a normalisation
module, then the VGG-19 feature stack with ``ContentLoss``/``StyleLoss`` modules inserted after the
loss layers, the targets computed once when those modules are built, ReLUs made out-of-place, a
closure that clamps the image and sums the losses, L-BFGS. Departures, so that it computes the same
function as nst-lightning and its per-iteration time compares like with like:

- the loss layers are nst-lightning's defaults (``relu4_2`` content; ``relu1_1`` ... ``relu5_1``
  style, where the tutorial takes the convolutions), with the same Gram normalisation and weights
  (content 1, style 1e6), on the network as it comes (not normalised);
- L-BFGS runs ``max_iter=1`` per ``step`` (one iteration, one function evaluation), history 100;
- the targets are computed by the network without the loss modules (the tutorial's way needs the
  content and style images to have the same size; here they keep their own, as in nst-lightning).

Unlike the tutorial, which trims the network after the last loss layer, the whole VGG-19 feature
stack runs (the issue's "full VGG-19"): truncation is one of the optimisations being measured.
Nothing else is optimised: default memory layout, no compilation, per-module Python losses.
"""

from __future__ import annotations

import common  # before nst_lightning: this checkout's package, not an installed copy
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_lightning.core.backbones import IMAGENET_MEAN, IMAGENET_STD, layer_names
from nst_lightning.names import CONTENT_LAYERS, STYLE_LAYERS  # nst-lightning's defaults: the same function


def gram_matrix(input: Tensor) -> Tensor:  # noqa: A002 - the tutorial's names
    a, b, c, d = input.size()
    features = input.view(a * b, c * d)
    G = torch.mm(features, features.t())
    return G.div(a * b * c * d)


class ContentLoss(nn.Module):
    def __init__(self, target: Tensor) -> None:
        super().__init__()
        self.target = target.detach()
        self.loss = torch.zeros(())

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        self.loss = F.mse_loss(input, self.target)
        return input


class StyleLoss(nn.Module):
    def __init__(self, target_feature: Tensor) -> None:
        super().__init__()
        self.target = gram_matrix(target_feature).detach()
        self.loss = torch.zeros(())

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        G = gram_matrix(input)
        self.loss = F.mse_loss(G, self.target)
        return input


class Normalization(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.mean = mean.view(-1, 1, 1)
        self.std = std.view(-1, 1, 1)

    def forward(self, img: Tensor) -> Tensor:
        return (img - self.mean) / self.std


def get_style_model_and_losses(
    cnn: nn.Sequential, content_img: Tensor, style_img: Tensor
) -> tuple[nn.Sequential, list[StyleLoss], list[ContentLoss]]:
    device = content_img.device
    normalization = Normalization(torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device))
    content_losses, style_losses = [], []
    model = nn.Sequential(normalization)
    plain = nn.Sequential(normalization)  # the network so far without loss modules: for the targets
    for name, layer in zip(layer_names(cnn), cnn, strict=True):
        if isinstance(layer, nn.ReLU):
            # The in-place version does not play well with the losses inserted after the convolutions.
            layer = nn.ReLU(inplace=False)
        model.add_module(name, layer)
        plain.add_module(name, layer)
        if name in CONTENT_LAYERS:
            with torch.no_grad():
                target = plain(content_img).detach()
            content_loss = ContentLoss(target)
            model.add_module(f"content_loss_{name}", content_loss)
            content_losses.append(content_loss)
        if name in STYLE_LAYERS:
            with torch.no_grad():
                target_feature = plain(style_img).detach()
            style_loss = StyleLoss(target_feature)
            model.add_module(f"style_loss_{name}", style_loss)
            style_losses.append(style_loss)
    # (The tutorial trims the model after the last loss here; the reference keeps the full network.)
    return model, style_losses, content_losses


class Reference:
    """One tutorial-style optimisation: ``step()`` is one L-BFGS iteration (one closure call)."""

    def __init__(
        self,
        cnn: nn.Sequential,
        content_img: Tensor,
        style_img: Tensor,
        style_weight: float = 1e6,
        content_weight: float = 1.0,
    ) -> None:
        cnn = cnn.to(content_img.device).eval().requires_grad_(False)
        self.model, self.style_losses, self.content_losses = get_style_model_and_losses(cnn, content_img, style_img)
        self.model.eval().requires_grad_(False)
        self.input_img = content_img.clone().requires_grad_(True)
        self.optimizer = torch.optim.LBFGS([self.input_img], max_iter=1, history_size=100)
        self.style_weight, self.content_weight = style_weight, content_weight
        self.evaluations = 0

    def loss(self) -> Tensor:
        """The total loss of the current image (what the closure minimises), without a backward pass."""
        with torch.no_grad():
            self.model(self.input_img)
            return self._total()

    def _total(self) -> Tensor:
        style_score = sum(sl.loss for sl in self.style_losses)
        content_score = sum(cl.loss for cl in self.content_losses)
        return self.style_weight * style_score + self.content_weight * content_score

    def step(self) -> float:
        def closure() -> Tensor:
            with torch.no_grad():
                self.input_img.clamp_(0, 1)
            self.optimizer.zero_grad()
            self.model(self.input_img)
            loss = self._total()
            loss.backward()
            self.evaluations += 1
            return loss

        return float(self.optimizer.step(closure))


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/reference.py --size 256 --steps 5``: the reference alone on the sample pair
    (random weights, as the timing harness runs it): seconds per iteration and the loss."""
    parser = common.base_parser(main.__doc__)
    parser.add_argument("--size", type=int, default=256, help="longest side of the content image (default 256)")
    parser.add_argument("--steps", type=int, default=5, help="L-BFGS iterations (default 5)")
    args = parser.parse_args(argv)
    common.setup_torch(args.threads, args.device)
    from nst_lightning.core.backbones import load_backbone
    from nst_lightning.run.data import StyleTransferDataModule

    data = StyleTransferDataModule(str(common.CONTENT), str(common.STYLE), image_size=args.size)
    content, style = data.content_image.to(args.device), data.style_image.to(args.device)
    ref = Reference(load_backbone("vgg19", "random"), content, style)
    ref.step()  # warm-up
    clock = common.Clock(args.device)
    for _ in range(args.steps):
        clock.start()
        ref.step()
        clock.stop()
    print(f"{args.size} px: {common.median(clock.times):.3f} s per iteration, loss {float(ref.loss()):.6g}")


if __name__ == "__main__":
    main()
