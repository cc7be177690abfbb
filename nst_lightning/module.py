"""``StyleTransfer``: Gatys et al.'s optimisation as a LightningModule.

The stylised image is the only trainable tensor. The targets (content activations and style Gram
matrices) are computed once in ``setup`` and kept as buffers, so they live on the module's device
and in its checkpoints. Optimisation is manual: L-BFGS (or Adam) calls a closure that runs the
extractor, the losses and the backward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn

from nst_lightning.errors import ConfigError, NumericalError
from nst_lightning.features import BACKBONES, FeatureExtractor
from nst_lightning.losses import content_loss, gram_matrix, style_loss, total_variation

INITS = ("content", "style", "noise")

# Dynamic loss scaling for fp16 (see ``_evaluate``): start, back-off on overflow, growth.
_SCALE_START, _SCALE_BACKOFF, _SCALE_GROWTH_INTERVAL, _SCALE_TRIES = 2.0**16, 2.0**-4, 100, 12


def _bf16_is_native_on_cpu() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class StyleTransfer(L.LightningModule):
    """Neural style transfer after Gatys et al. (2016): the image is the model.

    Args:
        content_layers: layers whose activations must match the content image's.
        style_layers: layers whose Gram matrices must match the style image's.
        style_layer_weights: one weight per style layer (default: 1 for each, summed).
        content_weight: weight of the content loss (alpha in the paper).
        style_weight: weight of the style loss (beta in the paper).
        tv_weight: weight of the total-variation loss (0 turns it off).
        backbone: feature network: vgg19 or vgg16.
        weights: backbone weights: 'imagenet' (torchvision, via the torch hub cache), 'random'
            (tests and dry runs only) or the path of a torchvision state dict.
        pooling: 'max' (as the backbone was trained) or 'avg' (as Gatys et al. recommend).
        init: the image the optimisation starts from: content, style or noise.
        seed: seed of the noise init.
        optimizer: lbfgs (one training step = one L-BFGS iteration) or adam.
        lr: learning rate (default: 1.0 for lbfgs, 0.02 for adam).
        lbfgs_history_size: L-BFGS memory (number of past updates kept).
        lbfgs_line_search: None (one function evaluation per step) or strong_wolfe.
        compile: compile the loss computation with torch.compile (opt-in: a one-off cost of tens of
            seconds at the first step, then faster steps; see the README's Benchmarks).
    """

    def __init__(
        self,
        content_layers: Sequence[str] = ("conv4_2",),
        style_layers: Sequence[str] = ("conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"),
        style_layer_weights: Sequence[float] | None = None,
        content_weight: float = 1.0,
        style_weight: float = 1e6,
        tv_weight: float = 0.0,
        backbone: str = "vgg19",
        weights: str = "imagenet",
        pooling: Literal["max", "avg"] = "max",
        init: Literal["content", "style", "noise"] = "content",
        seed: int = 0,
        optimizer: Literal["lbfgs", "adam"] = "lbfgs",
        lr: float | None = None,
        lbfgs_history_size: int = 100,
        lbfgs_line_search: Literal["strong_wolfe"] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        content_layers, style_layers = list(content_layers), list(style_layers)
        if style_layer_weights is None:
            style_layer_weights = [1.0] * len(style_layers)
        style_layer_weights = [float(w) for w in style_layer_weights]
        self._validate(
            content_layers,
            style_layers,
            style_layer_weights,
            content_weight,
            style_weight,
            tv_weight,
            backbone,
            init,
            optimizer,
            lr,
            lbfgs_history_size,
        )
        self.save_hyperparameters()
        self.content_layers = content_layers
        self.style_layers = style_layers
        self.style_layer_weights = dict(zip(style_layers, style_layer_weights, strict=True))
        self.extractor = FeatureExtractor(content_layers + style_layers, backbone, weights, pooling)
        self.register_parameter("image", None)  # made in setup(), once the content image is known
        self.register_buffer("loss_scale", torch.tensor(_SCALE_START))
        self._finite_steps = 0
        if compile:
            self.compile()  # nn.Module.compile: compiles forward (extractor and losses) in place

    @staticmethod
    def _validate(
        content_layers,
        style_layers,
        style_layer_weights,
        content_weight,
        style_weight,
        tv_weight,
        backbone,
        init,
        optimizer,
        lr,
        history,
    ) -> None:
        if backbone not in BACKBONES:
            raise ConfigError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
        if not content_layers and not style_layers:
            raise ConfigError("no content_layers and no style_layers: give at least one layer")
        if len(style_layer_weights) != len(style_layers):
            raise ConfigError(
                f"model.style_layer_weights has {len(style_layer_weights)} values but model.style_layers has "
                f"{len(style_layers)} layers: give one weight per style layer"
            )
        named = {"content_weight": content_weight, "style_weight": style_weight, "tv_weight": tv_weight}
        named.update({f"style_layer_weights[{i}]": w for i, w in enumerate(style_layer_weights)})
        for name, value in named.items():
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"model.{name} must be a finite number >= 0, got {value}")
        if init not in INITS:
            raise ConfigError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
        if optimizer not in ("lbfgs", "adam"):
            raise ConfigError(f"unknown optimizer {optimizer!r}: choose lbfgs or adam")
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"model.lr must be a positive number, got {lr}")
        if history < 1:
            raise ConfigError(f"model.lbfgs_history_size must be at least 1, got {history}")

    # ------------------------------------------------------------------ set-up

    def setup(self, stage: str) -> None:
        """Builds the image parameter and the targets from the datamodule's images (once)."""
        if self.image is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or getattr(datamodule, "content_image", None) is None:
            raise ConfigError("StyleTransfer needs a StyleTransferDataModule (the data: section of the config)")
        self._check_precision()
        content, style = datamodule.content_image, datamodule.style_image
        self._check_size(content, "content")
        self._check_size(style, "style")
        # setup() runs before Lightning moves the module, so compute the targets where the
        # optimisation will run rather than on the CPU.
        device = self.trainer.strategy.root_device
        self.extractor.to(device)
        with torch.no_grad():
            self.set_targets(content.to(device), style.to(device))
        # L-BFGS flattens the gradient with view(): the image must be contiguous.
        self.image = nn.Parameter(self._initial_image(content, style).to(device).contiguous())

    def set_targets(self, content: Tensor, style: Tensor) -> None:
        """Computes content activations and style Gram matrices once, as buffers."""
        content_features = self.extractor(content)
        style_features = content_features if style is content else self.extractor(style)
        for layer in self.content_layers:
            self.register_buffer(f"target_content_{layer}", content_features[layer].detach().float())
        for layer in self.style_layers:
            self.register_buffer(f"target_gram_{layer}", gram_matrix(style_features[layer]).detach())

    def _initial_image(self, content: Tensor, style: Tensor) -> Tensor:
        init = self.hparams.init
        if init == "content":
            return content.clone()
        if init == "style":
            return F.interpolate(
                style, size=content.shape[-2:], mode="bicubic", antialias=True, align_corners=False
            ).clamp_(0, 1)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return torch.rand(content.shape, generator=generator)

    def _check_size(self, image: Tensor, which: str) -> None:
        need = self.extractor.min_image_side
        height, width = image.shape[-2:]
        if min(height, width) < need:
            deepest = list(self.extractor.body.named_children())[-1][0]
            raise ConfigError(
                f"the {which} image is {width}x{height} px after resizing, too small for layer {deepest}: "
                f"its shorter side must be at least {need} px; raise data.image_size or use shallower layers"
            )

    def _check_precision(self) -> None:
        precision = str(self.trainer.precision)
        if precision in ("16-true", "bf16-true", "16", "bf16", "transformer-engine"):
            raise ConfigError(
                f"trainer.precision {precision} would store the image itself in half precision; "
                "use 32-true, bf16-mixed or 16-mixed"
            )
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
            # Lightning refuses L-BFGS while its GradScaler is set ("AMP and the LBFGS optimizer are
            # not compatible"); the closure does its own loss scaling instead (see _evaluate).
            plugin.scaler = None
        if precision.startswith("bf16") and self.trainer.strategy.root_device.type == "cpu":
            if not _bf16_is_native_on_cpu():
                warnings.warn(
                    f"trainer.precision is {precision} but this CPU has no native bfloat16: it runs many "
                    "times slower than 32-true; use --trainer.precision 32-true on this machine",
                    stacklevel=2,
                )

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        lr = self.hparams.lr
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam([self.image], lr=lr or 0.02)
        # max_iter=1: each Lightning step is exactly one L-BFGS iteration (one closure evaluation
        # without line search), so trainer.max_steps counts iterations as the seed does. The curvature
        # history persists across steps in the optimiser state.
        return torch.optim.LBFGS(
            [self.image],
            lr=lr or 1.0,
            max_iter=1,
            history_size=self.hparams.lbfgs_history_size,
            line_search_fn=self.hparams.lbfgs_line_search,
        )

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """The weighted losses of ``image`` against the targets: total, content, style (and per
        style layer) and tv. All float32."""
        features = self.extractor(image)
        zero = image.new_zeros((), dtype=torch.float32)
        losses: dict[str, Tensor] = {}
        content = zero
        for layer in self.content_layers:
            content = content + content_loss(features[layer], getattr(self, f"target_content_{layer}"))
        if self.content_layers:
            content = content / len(self.content_layers)
        style = zero
        for layer in self.style_layers:
            term = style_loss(gram_matrix(features[layer]), getattr(self, f"target_gram_{layer}"))
            losses[f"style_{layer}"] = term.detach()
            style = style + self.style_layer_weights[layer] * term
        tv = total_variation(image) if self.hparams.tv_weight > 0 else zero
        total = self.hparams.content_weight * content + self.hparams.style_weight * style + self.hparams.tv_weight * tv
        losses.update(total=total, content=content.detach(), style=style.detach(), tv=tv.detach())
        return losses

    def _scales_loss(self) -> bool:
        return str(self.trainer.precision) == "16-mixed"

    def _evaluate(self, optimizer: Any) -> dict[str, Tensor]:
        """One function evaluation: losses and the image gradient.

        Under 16-mixed the closure does its own dynamic loss scaling (Lightning's GradScaler cannot
        drive L-BFGS): the loss is multiplied by ``loss_scale`` before the backward pass and the
        gradient divided after it; an overflowing gradient is recomputed at a smaller scale, so
        L-BFGS only ever sees finite gradients.
        """
        for _ in range(_SCALE_TRIES):
            optimizer.zero_grad()
            losses = self(self.image)
            total = losses["total"]
            if not torch.isfinite(total):
                raise NumericalError(
                    f"the loss became {float(total)} at step {self.global_step}: lower model.style_weight "
                    "or model.lr, or use --trainer.precision 32-true"
                )
            if not self._scales_loss():
                self.manual_backward(total)
                return losses
            scale = float(self.loss_scale)
            self.manual_backward(total * scale)
            grad = self.image.grad
            if bool(torch.isfinite(grad).all()):
                grad.div_(scale)
                self._finite_steps += 1
                if self._finite_steps % _SCALE_GROWTH_INTERVAL == 0:
                    self.loss_scale.mul_(2.0)
                return losses
            self.loss_scale.mul_(_SCALE_BACKOFF)
            self._finite_steps = 0
        raise NumericalError(
            f"the gradient overflowed float16 at every loss scale tried (step {self.global_step}): "
            "use --trainer.precision bf16-mixed or 32-true"
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        evaluations: list[dict[str, Tensor]] = []

        def closure() -> Tensor:
            losses = self._evaluate(optimizer)
            evaluations.append(losses)
            return losses["total"]

        optimizer.step(closure=closure)
        # Log the losses at the point where this step started (L-BFGS's first evaluation).
        first = evaluations[0]
        self.log("loss", first["total"].detach(), prog_bar=True, batch_size=1)
        self.log_dict({f"loss/{k}": v for k, v in first.items() if k != "total"}, batch_size=1)
        self.log("closure_evaluations", float(len(evaluations)), batch_size=1)
        return first["total"].detach()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen extractor comes from the config: keep its weights out of checkpoints."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("extractor.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        saved = state.get("image")
        if self.image is not None and saved is not None and saved.shape != self.image.shape:
            raise ConfigError(
                f"the checkpoint holds a {saved.shape[-1]}x{saved.shape[-2]} image but this run's is "
                f"{self.image.shape[-1]}x{self.image.shape[-2]}: resume with the same data.image_size and images"
            )
        state.update({f"extractor.{k}": v for k, v in self.extractor.state_dict().items()})
