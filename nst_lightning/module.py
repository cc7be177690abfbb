"""``StyleTransfer``: Gatys et al.'s optimisation as a LightningModule.

The stylised image is the only trainable tensor. The targets (content activations and style
statistics) are computed once per scale and kept as buffers of small target modules, so they live
on the module's device and in its checkpoints. Optimisation is manual: L-BFGS (or Adam) calls a
closure that runs the extractor, the losses and the backward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from nst_lightning.checkpoint import config_differences, config_mismatch
from nst_lightning.color import combine_luminance, grey_rgb, luminance, match_color, match_luminance
from nst_lightning.data import Inputs
from nst_lightning.errors import CheckpointError, ConfigError, NumericalError
from nst_lightning.features import BACKBONES, FeatureExtractor
from nst_lightning.image_io import load_image
from nst_lightning.losses import total_variation
from nst_lightning.memory import check_fits
from nst_lightning.targets import STYLE_TARGETS, ContentTarget, resize_mask

INITS = ("content", "style", "noise")

# Dynamic loss scaling for fp16 (see ``_evaluate``): start, back-off on overflow, growth.
_SCALE_START, _SCALE_BACKOFF, _SCALE_GROWTH_INTERVAL, _SCALE_TRIES = 2.0**16, 2.0**-4, 100, 12
# Function evaluations the strong-Wolfe line search may spend in one L-BFGS iteration (torch's max_ls).
_LINE_SEARCH_EVALS = 25
# A mean activation above this, in a network that is not normalised, is on Caffe's scale (torchvision's
# weights give about 1, Caffe-converted ones 20-300), where the default loss weights overflow.
_LARGE_ACTIVATIONS = 10.0
# A checkpoint's targets may differ from this run's by this much (relative) and still be "the same images".
_TARGET_TOLERANCE = 1e-2


def _bf16_is_native_on_cpu() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _validate(
    *,
    content_layers,
    style_layers,
    style_layer_weights,
    content_weight,
    style_weight,
    tv_weight,
    style_loss,
    preserve_color,
    backbone,
    init,
    optimizer,
    lr,
    history,
    scales,
    scale_steps,
    float32_final_steps,
) -> None:
    """Refuses configurations that cannot work, with the fix, before anything heavy loads."""
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
    if content_weight == 0 and style_weight == 0:
        raise ConfigError(
            "model.content_weight and model.style_weight are both 0, which leaves nothing to match: "
            "give at least one of them a positive value"
        )
    if style_loss not in STYLE_TARGETS:
        raise ConfigError(f"unknown style_loss {style_loss!r}: choose one of {', '.join(STYLE_TARGETS)}")
    if preserve_color not in ("none", "luminance", "histogram"):
        raise ConfigError(f"unknown preserve_color {preserve_color!r}: choose none, luminance or histogram")
    if init not in INITS and not Path(init).is_file():
        raise ConfigError(
            f"model.init {init!r} is neither {', '.join(INITS)} nor an existing image file: "
            "choose one of those or give the path of an image"
        )
    if optimizer not in ("lbfgs", "adam"):
        raise ConfigError(f"unknown optimizer {optimizer!r}: choose lbfgs or adam")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"model.lr must be a positive number, got {lr}")
    if history < 1:
        raise ConfigError(f"model.lbfgs_history_size must be at least 1, got {history}")
    if float32_final_steps < 0:
        raise ConfigError(f"model.float32_final_steps must be 0 or more, got {float32_final_steps}")
    if (scales is None) != (scale_steps is None):
        raise ConfigError("model.scales and model.scale_steps go together: give both or neither")
    if scales is not None:
        if not scales or len(scales) != len(scale_steps):
            raise ConfigError(
                f"model.scales has {len(scales)} sizes but model.scale_steps {len(scale_steps)} values: "
                "give one number of iterations per scale"
            )
        if any(s < 1 for s in scales) or any(b <= a for a, b in zip(scales, scales[1:], strict=False)):
            raise ConfigError(f"model.scales must be positive sizes in ascending order, got {list(scales)}")
        if any(n < 1 for n in scale_steps):
            raise ConfigError(f"model.scale_steps must be at least 1 each, got {list(scale_steps)}")


class StyleTransfer(L.LightningModule):
    """Neural style transfer after Gatys et al. (2016): the image is the model.

    Args:
        content_layers: layers whose activations must match the content image's.
        style_layers: layers whose style statistics must match the style images'.
        style_layer_weights: one weight per style layer (default: 1 for each, summed).
        content_weight: weight of the content loss (alpha in the paper).
        style_weight: weight of the style loss (beta in the paper).
        tv_weight: weight of the total-variation loss (0 turns it off).
        style_loss: 'gram' (Gatys et al.: MSE of Gram matrices) or 'mean_cov' (2-Wasserstein
            distance between the features' Gaussians, as crowsonkb/style-transfer-pytorch).
        preserve_color: keep the content's colours: 'none', 'luminance' (transfer on luminance
            only, Gatys et al. 2017) or 'histogram' (recolour the style images to the content's
            colour distribution before optimising).
        backbone: feature network: vgg19, vgg16 or resnet18.
        weights: backbone weights: 'imagenet' (torchvision, via the torch hub cache), 'random'
            (tests and dry runs only) or the path of a torchvision state dict.
        normalize: normalise the network as Gatys et al. did: each layer divided by its mean
            activation on the shipped sample images, so the loss weights mean the same for any
            weights file (torchvision's and Caffe-converted ones, whose activations are ~100x larger).
        layer_means: the mean activation of each layer, measured when null; the run's saved
            config.yaml records the values used, so rerunning it uses exactly those.
        pooling: 'max' (as the backbone was trained) or 'avg' (as Gatys et al. recommend).
        init: the image the optimisation starts from: content, style, noise or the path of an image.
        seed: seed of the noise init.
        optimizer: lbfgs (one training step = one L-BFGS iteration) or adam.
        lr: learning rate (default: 1.0 for lbfgs, 0.02 for adam).
        lbfgs_history_size: L-BFGS memory (number of past updates kept; torch's default is 100).
        lbfgs_line_search: strong_wolfe (the default: a step that would raise the loss is shortened,
            which keeps the first steps out of overflow, for about 5% more evaluations) or None
            (one function evaluation per step, whatever it does to the loss).
        scales: coarse-to-fine sizes (longest side, ascending, the last one data.image_size), e.g.
            [256, 362, 512]; None optimises at data.image_size only.
        scale_steps: iterations at each of ``scales``; trainer.max_steps must be at least their sum
            (any further steps run at the last scale).
        compile: compile the loss computation with torch.compile (opt-in: a one-off cost of tens of
            seconds at the first step, then faster steps; see the README's Benchmarks).
        float32_final_steps: under bf16-mixed or 16-mixed, the last this many iterations run in
            float32: mixed precision is the faster way down, float32 reaches the lower loss at the
            end (see the README's Mixed precision); 0 keeps mixed precision to the end.
    """

    def __init__(
        self,
        content_layers: Sequence[str] = ("relu4_2",),
        style_layers: Sequence[str] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
        style_layer_weights: Sequence[float] | None = None,
        content_weight: float = 1.0,
        style_weight: float = 1e6,
        tv_weight: float = 0.0,
        style_loss: Literal["gram", "mean_cov"] = "gram",
        preserve_color: Literal["none", "luminance", "histogram"] = "none",
        backbone: str = "vgg19",
        weights: str = "imagenet",
        normalize: bool = True,
        layer_means: dict[str, float] | None = None,
        pooling: Literal["max", "avg"] = "max",
        init: str = "content",
        seed: int = 0,
        optimizer: Literal["lbfgs", "adam"] = "lbfgs",
        lr: float | None = None,
        lbfgs_history_size: int = 50,
        lbfgs_line_search: Literal["strong_wolfe"] | None = "strong_wolfe",
        scales: Sequence[int] | None = None,
        scale_steps: Sequence[int] | None = None,
        compile: bool = False,
        float32_final_steps: int = 50,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        content_layers, style_layers = list(content_layers), list(style_layers)
        if style_layer_weights is None:
            style_layer_weights = [1.0] * len(style_layers)
        style_layer_weights = [float(w) for w in style_layer_weights]
        _validate(
            content_layers=content_layers,
            style_layers=style_layers,
            style_layer_weights=style_layer_weights,
            content_weight=content_weight,
            style_weight=style_weight,
            tv_weight=tv_weight,
            style_loss=style_loss,
            preserve_color=preserve_color,
            backbone=backbone,
            init=init,
            optimizer=optimizer,
            lr=lr,
            history=lbfgs_history_size,
            scales=scales,
            scale_steps=scale_steps,
            float32_final_steps=float32_final_steps,
        )
        self.save_hyperparameters()
        self.extractor = FeatureExtractor(
            content_layers + style_layers, backbone, weights, pooling, normalize=normalize, layer_means=layer_means
        )
        # The means actually used go into the hyper-parameters, and so into checkpoints and hparams.yaml.
        self.save_hyperparameters({**self.hparams, "layer_means": self.extractor.layer_means})
        self.content_layers = content_layers
        self.style_layers = style_layers
        self.style_layer_weights = dict(zip(style_layers, style_layer_weights, strict=True))
        self.register_parameter("image", None)  # made in setup(), once the content image is known
        self.register_buffer("loss_scale", torch.tensor(_SCALE_START))
        # The last image whose loss and gradient were finite: what a numerical fault falls back to.
        self.register_buffer("last_finite_image", None, persistent=False)
        self._finite_steps = 0
        self._last_evaluation: tuple[bool, dict[str, Tensor], Tensor | None] | None = None
        self.evaluations = 0
        """Function evaluations (forward and backward passes) made so far in this process."""
        self._scale = 0  # index into the sizes of a coarse-to-fine run
        self._style_group_weights: list[float] = []
        if compile:
            self.compile()  # nn.Module.compile: compiles forward (extractor and losses) in place

    # ------------------------------------------------------------------ set-up

    def setup(self, stage: str) -> None:
        """Builds the image parameter and the targets from the datamodule's images (once)."""
        if self.image is not None:
            return
        self._check_precision()
        sizes = self._sizes()
        # Sizes and memory are checked before any image is resized: a resize to an absurd size would
        # itself be what runs out of memory.
        self._check_size(self.datamodule.content_size(sizes[0]), "content")
        for style in self.datamodule.style_sizes(sizes[0]):
            self._check_size(style, "style")
        width, height = self.datamodule.content_size(sizes[-1])
        self._check_memory(height, width)
        inputs = self.datamodule.inputs(sizes[0])
        # setup() runs before Lightning moves the module, so compute the targets where the
        # optimisation will run rather than on the CPU.
        device = self.trainer.strategy.root_device
        self.extractor.to(device)
        with torch.no_grad():
            self.set_targets(inputs, device)
        # L-BFGS flattens the gradient with view(): the image must be contiguous.
        self.image = nn.Parameter(self._initial_image(inputs).to(device).contiguous())
        self._scale = 0

    @property
    def datamodule(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "inputs"):
            raise ConfigError("StyleTransfer needs a StyleTransferDataModule (the data: section of the config)")
        return datamodule

    def _sizes(self) -> list[int]:
        """The longest side of the image at each scale; checks the schedule against the run."""
        image_size = self.datamodule.image_size
        if self.hparams.scales is None:
            return [image_size]
        scales, steps = list(self.hparams.scales), list(self.hparams.scale_steps)
        if scales[-1] != image_size:
            raise ConfigError(
                f"model.scales ends at {scales[-1]} but data.image_size is {image_size}: "
                f"make the last scale {image_size}"
            )
        max_steps = self.trainer.max_steps
        if sum(steps) > max_steps:
            raise ConfigError(
                f"model.scale_steps add up to {sum(steps)} but trainer.max_steps is {max_steps}, so the run would "
                f"end before the last scale: set --trainer.max_steps {sum(steps)} (or more)"
            )
        return scales

    def _scale_at(self, step: int) -> int:
        if self.hparams.scales is None:
            return 0
        bounds = torch.tensor(self.hparams.scale_steps).cumsum(0)
        return min(int((bounds <= step).sum()), len(bounds) - 1)

    def _prepare(self, inputs: Inputs) -> tuple[Tensor, list[Tensor]]:
        """The content and style images as the optimisation sees them (colour control)."""
        content, styles = inputs.content, inputs.styles
        if self.hparams.preserve_color == "histogram":
            styles = [match_color(style, content) for style in styles]
        elif self.hparams.preserve_color == "luminance":
            content_y = luminance(content)
            styles = [grey_rgb(match_luminance(luminance(style), content_y)) for style in styles]
            content = grey_rgb(content_y)
        return content, styles

    def set_targets(self, inputs: Inputs, device: torch.device | str = "cpu") -> None:
        """Computes the content activations and style statistics once, as buffers.

        Without masks the style images' statistics are blended (weights summing to 1) into one
        target per layer. With masks each style gets its own target, compared with the statistics
        of its region; its weight is its blend weight times the number of styles (1 for equal
        blends), so each region gets the full style weight.
        """
        self._last_evaluation = None  # new targets: a new function
        content, styles = self._prepare(inputs)
        content, styles = content.to(device), [style.to(device) for style in styles]
        content_features = self.extractor(content)
        # The largest mean activation of a layer in use: what a message about an overflow can point to.
        self._activation_scale = max(
            (float(f.clamp(min=0).mean()), layer) for layer, f in content_features.items()
        )
        style_features = [self.extractor(style) for style in styles]
        self.register_buffer("content_image", inputs.content.to(device))
        self.content_targets = nn.ModuleDict(
            {layer: ContentTarget(content_features[layer]) for layer in self.content_layers}
        )
        target_class = STYLE_TARGETS[self.hparams.style_loss]
        if inputs.masks is None:
            groups = [(style_features, inputs.blend, None)]
            self._style_group_weights = [1.0]
        else:
            groups = [([f], [1.0], mask.to(device)) for f, mask in zip(style_features, inputs.masks, strict=True)]
            self._style_group_weights = [w * len(inputs.blend) for w in inputs.blend]
        self.style_targets = nn.ModuleDict(
            {
                layer: nn.ModuleList(
                    target_class([f[layer] for f in features], blend, resize_mask(mask, content_features[layer]))
                    for features, blend, mask in groups
                )
                for layer in self.style_layers
            }
        )

    def _initial_image(self, inputs: Inputs) -> Tensor:
        """The starting image; with ``preserve_color: luminance`` a one-channel luminance image
        (the network sees it as grey RGB, and the output takes the content's chroma)."""
        content, styles = self._prepare(inputs)
        init, shape = self.hparams.init, content.shape[-2:]
        if init == "content":
            image = content.clone()
        elif init == "noise":
            generator = torch.Generator().manual_seed(self.hparams.seed)
            image = torch.rand(content.shape, generator=generator)
        else:
            image = styles[0] if init == "style" else load_image(init)
            image = F.interpolate(image, size=shape, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        return luminance(image) if self.hparams.preserve_color == "luminance" else image

    def _enter_scale(self, index: int) -> None:
        """Moves a coarse-to-fine run to scale ``index``: targets recomputed at the new size, the
        image upsampled, the optimiser state reset (its history belongs to the old size)."""
        inputs = self.datamodule.inputs(self._sizes()[index])
        with torch.no_grad():
            self.set_targets(inputs, self.image.device)
            upsampled = F.interpolate(
                self.image.detach(), size=inputs.content.shape[-2:], mode="bicubic", align_corners=False
            )
        self.image.data = upsampled.contiguous()
        self.image.grad = None
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
            if isinstance(optimizer, torch.optim.LBFGS):
                optimizer._numel_cache = None  # L-BFGS caches the parameter count
        self._scale = index

    def _check_memory(self, height: int, width: int) -> None:
        """Refuses, before any work, a run whose estimated peak memory exceeds what the device has
        free (the message suggests an image size that fits)."""
        hp = self.hparams
        # A float32 finish needs the float32 footprint, whatever the rest of the run uses.
        precision = "32-true" if self._float32_start() is not None else str(self.trainer.precision)
        check_fits(
            height,
            width,
            content_layers=self.content_layers,
            style_layers=self.style_layers,
            backbone=hp.backbone,
            pooling=hp.pooling,
            optimizer=hp.optimizer,
            history_size=hp.lbfgs_history_size,
            precision=precision,
            weights=hp.weights,
            device=self.trainer.strategy.root_device.type,
        )

    def _check_size(self, size: tuple[int, int], which: str) -> None:
        need = self.extractor.min_image_side
        width, height = size
        if min(height, width) < need:
            deepest = list(self.extractor.body.named_children())[-1][0]
            raise ConfigError(
                f"the {which} image is {width}x{height} px after resizing, too small for layer {deepest}: "
                f"its shorter side must be at least {need} px; raise data.image_size (or model.scales, "
                "data.style_scale), use shallower layers, or crop a very elongated image closer to a square"
            )

    def output_image(self) -> Tensor:
        """The current image as RGB in [0, 1] (with ``preserve_color: luminance``, the optimised
        luminance combined with the content's chroma)."""
        image = self.image.detach().float()
        if image.shape[1] == 1:  # preserve_color: luminance
            image = combine_luminance(image, self.content_image)
        return image.clamp(0, 1)

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
        # With max_iter=1 torch's default max_eval (max_iter * 5 // 4 = 1) would leave the line search
        # no evaluation to spend: it could only take or refuse the first trial step, and once it refused
        # one every later step would repeat it (the image would never move again).
        line_search = self.hparams.lbfgs_line_search
        return torch.optim.LBFGS(
            [self.image],
            lr=lr or 1.0,
            max_iter=1,
            max_eval=1 + _LINE_SEARCH_EVALS if line_search else None,
            history_size=self.hparams.lbfgs_history_size,
            line_search_fn=line_search,
        )

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """The weighted losses of ``image`` against the targets: total, content, style, style per
        layer (before the layer weight) and tv. All float32."""
        features = self.extractor(grey_rgb(image) if image.shape[1] == 1 else image)
        zero = image.new_zeros((), dtype=torch.float32)
        losses: dict[str, Tensor] = {}
        content = zero
        for layer, target in self.content_targets.items():
            content = content + target(features[layer])
        if self.content_layers:
            content = content / len(self.content_layers)
        style = zero
        for layer, targets in self.style_targets.items():
            term = sum(
                w * target(features[layer]) for w, target in zip(self._style_group_weights, targets, strict=True)
            )
            losses[f"style_{layer}"] = term.detach()
            style = style + self.style_layer_weights[layer] * term
        tv = total_variation(image) if self.hparams.tv_weight > 0 else zero
        total = self.hparams.content_weight * content + self.hparams.style_weight * style + self.hparams.tv_weight * tv
        losses.update(total=total, content=content.detach(), style=style.detach(), tv=tv.detach())
        return losses

    def _is_mixed(self) -> bool:
        return str(self.trainer.precision) in ("bf16-mixed", "16-mixed")

    def _float32_start(self) -> int | None:
        """The first step of a mixed-precision run's float32 finish; None where there is none."""
        max_steps, final = self.trainer.max_steps, self.hparams.float32_final_steps
        if not self._is_mixed() or max_steps < 0 or final == 0:
            return None
        return max(max_steps - final, 0)

    def in_float32_phase(self) -> bool:
        """Whether this step is one of the last ``float32_final_steps`` of a mixed-precision run,
        which run in float32 (without autocast)."""
        start = self._float32_start()
        return start is not None and self.global_step >= start

    def _precision_context(self):
        """No autocast in the float32 phase, else the trainer's own (none, or mixed precision)."""
        # Departure from a plain mixed-precision run: its last steps run in float32. Rounding the
        # activations to 8 bits of mantissa limits how far the loss can fall (L-BFGS ends up chasing
        # rounding noise); float32 takes it the rest of the way, with the history built so far.
        if self.in_float32_phase():
            return torch.autocast(self.image.device.type, enabled=False)
        return nullcontext()

    def _scales_loss(self) -> bool:
        return str(self.trainer.precision) == "16-mixed" and not self.in_float32_phase()

    def _evaluate(self, optimizer: Any) -> dict[str, Tensor]:
        """One function evaluation: losses and the image gradient.

        The image last evaluated is not evaluated again: its losses and gradient are handed back.
        (With one L-BFGS iteration per step, the line search ends on the point the next step starts
        from, which it has just evaluated; torch's L-BFGS would evaluate it again.)

        Under 16-mixed the closure does its own dynamic loss scaling (Lightning's GradScaler cannot
        drive L-BFGS): the loss is multiplied by ``loss_scale`` before the backward pass and the
        gradient divided after it; an overflowing gradient is recomputed at a smaller scale, so
        L-BFGS only ever sees finite gradients.

        A non-finite loss or gradient raises :class:`NumericalError` at once, naming the likely cause;
        every finite evaluation first records its image in ``last_finite_image``.
        """
        memo = self._last_evaluation
        if memo is not None and memo[0] == self.in_float32_phase() and self._is_last_finite_image():
            self.image.grad = memo[2]
            return memo[1]
        self.evaluations += 1
        for _ in range(_SCALE_TRIES):
            optimizer.zero_grad()
            with self._precision_context():
                losses = self(self.image)
            total = losses["total"]
            if not torch.isfinite(total):
                raise NumericalError(self._non_finite_loss(losses))
            if not self._scales_loss():
                self.manual_backward(total)
                if not bool(torch.isfinite(self.image.grad).all()):
                    raise NumericalError(
                        f"the gradient became non-finite at step {self.global_step} although the loss was "
                        f"{float(total.detach()):.4g}: lower model.lr or the loss weights{self._precision_hint()}"
                    )
                return self._remember(losses)
            scale = float(self.loss_scale)
            self.manual_backward(total * scale)
            grad = self.image.grad
            if bool(torch.isfinite(grad).all()):
                grad.div_(scale)
                self._finite_steps += 1
                if self._finite_steps % _SCALE_GROWTH_INTERVAL == 0:
                    self.loss_scale.mul_(2.0)
                return self._remember(losses)
            self.loss_scale.mul_(_SCALE_BACKOFF)
            self._finite_steps = 0
        raise NumericalError(
            f"the gradient overflowed float16 at every loss scale tried (step {self.global_step}): "
            "use --trainer.precision bf16-mixed or 32-true"
        )

    def _remember(self, losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keeps a finite evaluation: its image (``last_finite_image``), losses and gradient."""
        image = self.image.detach()
        if self.last_finite_image is None or self.last_finite_image.shape != image.shape:
            self.last_finite_image = image.clone()
        else:
            self.last_finite_image.copy_(image)
        # The gradient tensor itself: zero_grad() replaces image.grad rather than zeroing it.
        self._last_evaluation = (self.in_float32_phase(), losses, self.image.grad)
        return losses

    def _is_last_finite_image(self) -> bool:
        last = self.last_finite_image
        return last is not None and last.shape == self.image.shape and torch.equal(last, self.image.detach())

    def _precision_hint(self) -> str:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return f", or use --trainer.precision 32-true (this run uses {precision})" if "16" in precision else ""

    def _non_finite_loss(self, losses: dict[str, Tensor]) -> str:
        """The message for a non-finite total loss: which term, why, and what to change."""
        step, total = self.global_step, float(losses["total"].detach())
        terms = {"content": "content_weight", "style": "style_weight", "tv": "tv_weight"}
        mean, layer = getattr(self, "_activation_scale", (0.0, ""))
        if not self.hparams.normalize and mean > _LARGE_ACTIVATIONS:
            return (
                f"the loss became {total} at step {step}: this network's activations are on a large scale (mean "
                f"{mean:.3g} at {layer}, as with Caffe-converted weights) and model.normalize is false, so the "
                "loss weights are far too strong for it: set model.normalize true"
            )
        for term in terms:
            if not torch.isfinite(losses[term]):
                return (
                    f"the {term} loss became {float(losses[term])} at step {step}: the image or its features "
                    f"overflowed; lower model.lr or set model.lbfgs_line_search to strong_wolfe{self._precision_hint()}"
                )
        # Every term is finite: a weight times its term went beyond float32's range (about 3.4e38).
        key = max(terms, key=lambda term: abs(float(self.hparams[terms[term]]) * float(losses[term])))
        weight = terms[key]
        return (
            f"the loss became {total} at step {step}: model.{weight}={float(self.hparams[weight]):g} times the {key} "
            f"loss ({float(losses[key]):.3g}) is beyond float32's range (about 3.4e38); lower model.{weight}"
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        scale = self._scale_at(self.global_step)
        if scale != self._scale:
            self._enter_scale(scale)
        if self.global_step == self._float32_start():
            rank_zero_info(
                f"step {self.global_step}: the last {self.trainer.max_steps - self.global_step} iterations run in "
                "float32 (model.float32_final_steps)"
            )
        optimizer = self.optimizers()
        evaluations: list[dict[str, Tensor]] = []
        made = self.evaluations

        def closure() -> Tensor:
            losses = self._evaluate(optimizer)
            evaluations.append(losses)
            return losses["total"]

        try:
            optimizer.step(closure=closure)
        except NumericalError:
            # Fall back to the last image whose loss was finite: it is what gets written and kept.
            if self.last_finite_image is not None and self.last_finite_image.shape == self.image.shape:
                with torch.no_grad():
                    self.image.copy_(self.last_finite_image)
            raise
        # Log the losses at the point where this step started (L-BFGS's first evaluation).
        first = evaluations[0]
        self.log("loss", first["total"].detach(), prog_bar=True, batch_size=1)
        self.log_dict({f"loss/{k}": v for k, v in first.items() if k != "total"}, batch_size=1)
        self.log("closure_evaluations", float(self.evaluations - made), batch_size=1)
        return first["total"].detach()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen extractor comes from the config: keep its weights out of checkpoints."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("extractor.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint made with another image size, other settings or other images."""
        state = checkpoint.get("state_dict", {})
        saved = state.get("image")
        if self.image is not None and saved is not None and saved.shape != self.image.shape:
            # A coarse-to-fine run saved at a later scale: move there first (targets, image size).
            shapes = [self.datamodule.inputs(size).content.shape for size in self._sizes()]
            if saved.shape in shapes:
                self._enter_scale(shapes.index(saved.shape))
            else:
                raise ConfigError(
                    f"the checkpoint holds a {saved.shape[-1]}x{saved.shape[-2]} image but this run's is "
                    f"{self.image.shape[-1]}x{self.image.shape[-2]}: resume with the same data.image_size, "
                    "model.scales and images"
                )
        differences = config_differences(checkpoint.get("hyper_parameters") or {}, dict(self.hparams), "model")
        if differences:
            raise config_mismatch("the checkpoint", differences)
        self._check_targets(state)
        state.update({f"extractor.{k}": v for k, v in self.extractor.state_dict().items()})

    def _check_targets(self, state: dict[str, Any]) -> None:
        """The checkpoint's targets must be the ones this run's images give (else it came from other images)."""
        buffers = dict(self.named_buffers())
        for name, saved in state.items():
            current = buffers.get(name) if name.startswith(("content_targets.", "style_targets.")) else None
            if not isinstance(current, Tensor) or not isinstance(saved, Tensor):
                continue
            which = "content" if name.startswith("content_targets.") else "style"
            if saved.shape != current.shape:
                raise CheckpointError(
                    f"the checkpoint's {which} target {name} has shape {tuple(saved.shape)}, this run's "
                    f"{tuple(current.shape)}: resume with the same images, layers and data.image_size"
                )
            saved = saved.to(device=current.device, dtype=current.dtype)
            scale = float(current.norm()) or 1.0
            if float((saved - current).norm()) > _TARGET_TOLERANCE * scale:
                raise CheckpointError(
                    f"the checkpoint was made from another {which} image (or other weights): its target {name} "
                    f"differs from this run's; resume with the same data.{which} and model.weights, or start a new "
                    "run without --ckpt_path"
                )
