"""``StyleTransfer``: Gatys et al.'s optimisation as a LightningModule, and nothing but the training loop.

The stylised image is the only trainable tensor, built from the images the data module hands over
(:meth:`StyleTransfer.use_images`); one optimiser step per training step, through a closure. The loss is
:class:`~nst_lightning.objective.Objective`'s, each evaluation :class:`~nst_lightning.closure.Evaluator`'s,
the size at each step :mod:`~nst_lightning.schedule`'s; :mod:`~nst_lightning.checks` checks every setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_lightning import checks, schedule
from nst_lightning.backbones import AUTO, resolve_backbone
from nst_lightning.checkpoint import check_resume, saved_scale, upgrade_state_dict
from nst_lightning.checks import CONTENT_LAYERS, LBFGS_HISTORY_SIZE, STYLE_LAYERS, LineSearch, Optimizer, PreserveColor
from nst_lightning.closure import Evaluator
from nst_lightning.console import detail
from nst_lightning.data import ImageSource, Inputs
from nst_lightning.errors import ConfigError, NumericalError
from nst_lightning.features import FeatureExtractor, Pooling
from nst_lightning.image_io import load_image
from nst_lightning.lbfgs import DeviceLBFGS, last_accepted, make_lbfgs
from nst_lightning.losslog import LossLog, step_values
from nst_lightning.memory import check_run
from nst_lightning.objective import Objective
from nst_lightning.precision import SCALE_START, LossScaler, drop_lightning_scaler, float32_start


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
        backbone: auto (the weights file's; vgg19 for imagenet, random), vgg19, vgg16 or resnet18.
        weights: backbone weights: 'imagenet' (torchvision, via the torch hub cache), 'random'
            (tests and dry runs only) or the path of a state dict (its backbone is read from it).
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
        lbfgs_line_search: backtrack (the default: nst_lightning.lbfgs's L-BFGS, which never waits for
            the host; a step that raised the loss is undone and shortened at the next step), strong_wolfe
            (torch's L-BFGS with its line search, about 5% more evaluations) or None (torch's, without).
        scales: coarse-to-fine sizes (longest side, ascending, the last one data.image_size), e.g.
            [256, 362, 512]; None optimises at data.image_size only.
        scale_steps: iterations at each of ``scales``; trainer.max_steps must be at least their sum
            (any further steps run at the last scale).
        compile: compile the loss computation with torch.compile (a one-off cost; see docs/benchmarks.md).
        float32_final_steps: under bf16-mixed or 16-mixed, the last this many iterations run in
            float32: mixed precision is the faster way down, float32 reaches the lower loss at the
            end (see the README's Mixed precision); 0 keeps mixed precision to the end.
    """

    def __init__(
        self,
        content_layers: Sequence[str] = CONTENT_LAYERS,
        style_layers: Sequence[str] = STYLE_LAYERS,
        style_layer_weights: Sequence[float] | None = None,
        content_weight: float = 1.0,
        style_weight: float = 1e6,
        tv_weight: float = 0.0,
        style_loss: checks.StyleLoss = "gram",
        preserve_color: PreserveColor = "none",
        backbone: str = AUTO,
        weights: checks.NamedWeights | checks.InputPath = "imagenet",
        normalize: bool = True,
        layer_means: dict[str, float] | None = None,
        pooling: Pooling = "max",
        init: checks.Init | checks.InputPath = "content",
        seed: int = 0,
        optimizer: Optimizer = "lbfgs",
        lr: float | None = None,
        lbfgs_history_size: int = LBFGS_HISTORY_SIZE,
        lbfgs_line_search: LineSearch | None = "backtrack",
        scales: Sequence[int] | None = None,
        scale_steps: Sequence[int] | None = None,
        compile: bool = False,
        float32_final_steps: int = 50,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        weights, init = checks.plain(weights), checks.plain(init)
        content_layers, style_layers = list(content_layers), list(style_layers)
        if style_layer_weights is None:
            style_layer_weights = [1.0] * len(style_layers)
        style_layer_weights = [float(w) for w in style_layer_weights]
        backbone = resolve_backbone(backbone, weights)  # the name recorded: what was built
        self.save_hyperparameters()
        checks.check_model(**self.hparams)  # every setting, before the weights load
        extractor = FeatureExtractor(
            content_layers + style_layers, backbone, weights, pooling, normalize=normalize, layer_means=layer_means
        )
        # The means actually used go into the hyper-parameters, and so into checkpoints and hparams.yaml.
        self.save_hyperparameters({**self.hparams, "layer_means": extractor.layer_means})
        self.objective = Objective(
            extractor, content_layers, style_layers, style_layer_weights, content_weight, style_weight, tv_weight,
            style_loss, preserve_color,
        )  # fmt: skip
        self.register_parameter("image", None)  # made in setup(), once the content image is known
        self.register_buffer("loss_scale", torch.tensor(SCALE_START))  # 16-mixed's, kept in checkpoints
        self.evaluator = Evaluator(self.objective, self.manual_backward)
        self.images: ImageSource | None = None
        self.sizes: list[int] = []
        self._scale = 0  # index into self.sizes
        self.losses = LossLog()  # each step's losses, kept on the device and logged a few steps later
        if compile:
            self.objective.compile()  # nn.Module.compile: the extractor and the losses, in place

    def use_images(self, source: ImageSource) -> None:
        """Takes the images, at any size, from the data module (its ``setup`` calls this, before ours)."""
        self.images = source

    def setup(self, stage: str) -> None:
        """Checks the run, then builds the targets and the image parameter (once)."""
        if self.image is not None:
            return
        if self.images is None:
            raise ConfigError("StyleTransfer needs a StyleTransferDataModule (the data: section of the config)")
        hp, images, extractor = self.hparams, self.images, self.objective.extractor
        device = self.trainer.strategy.root_device
        checks.check_precision(str(self.trainer.precision), device.type, hp.compile)
        drop_lightning_scaler(self.trainer.precision_plugin)
        checks.check_schedule(hp.scales, hp.scale_steps, images.image_size, self.trainer.max_steps)
        self.sizes = schedule.sizes(hp.scales, images.image_size)
        # A float32 finish needs the float32 footprint, whatever the rest of the run uses.
        precision = "32-true" if self._float32_start() is not None else str(self.trainer.precision)
        check_run(images, self.sizes, extractor, hp, precision, device.type)
        inputs = images.inputs(self.sizes[0])
        # setup() runs before Lightning moves the module: the targets are computed where the
        # optimisation will run rather than on the CPU.
        extractor.to(device)
        with torch.no_grad():
            self.set_targets(inputs, device)
        init_file = load_image(hp.init) if hp.init not in checks.INITS else None
        start = self.objective.initial_image(inputs, hp.init, hp.seed, init_file)
        # L-BFGS flattens the gradient with view(): the image must be contiguous.
        self.image = nn.Parameter(start.to(device).contiguous())
        self._scale = 0

    def set_targets(self, inputs: Inputs, device: torch.device | str = "cpu") -> None:
        """The objective's targets from ``inputs`` (see :meth:`Objective.set_targets`): a new function to minimise."""
        self.evaluator.forget()
        self.objective.set_targets(inputs, device)

    @property
    def evaluations(self) -> int:
        """Function evaluations (forward and backward passes) made so far in this process."""
        return self.evaluator.count

    def on_train_start(self) -> None:
        # Under 16-mixed the scale starts from loss_scale: a resumed run's, restored by now.
        precision = str(self.trainer.precision)
        self.evaluator.start(precision, LossScaler(self.loss_scale) if precision == "16-mixed" else None)

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.losses]  # every Trainer that fits the module hands its losses on (and at the end, all)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam([self.image], lr=hp.lr or 0.02)
        return make_lbfgs(self.image, hp.lr or 1.0, hp.lbfgs_history_size, hp.lbfgs_line_search)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """The objective's losses of ``image``: total, content, style, style per layer and tv (float32)."""
        return self.objective(image)

    def _float32_start(self) -> int | None:
        return float32_start(str(self.trainer.precision), self.trainer.max_steps, self.hparams.float32_final_steps)

    def in_float32_phase(self) -> bool:
        """Whether this step is one of the float32 finish's (see ``float32_final_steps``)."""
        start = self._float32_start()
        return start is not None and self.global_step >= start

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        index = schedule.scale_at(self.global_step, self.hparams.scale_steps)
        if index != self._scale:
            self._enter_scale(index)
            # A new optimiser: L-BFGS's history (and its cached parameter count) belong to the old size.
            self.trainer.optimizers = [self.configure_optimizers()]

    def _enter_scale(self, index: int) -> None:
        """Moves a coarse-to-fine run to scale ``index``: targets recomputed at the new size, the image
        upsampled into a new parameter."""
        inputs = self.images.inputs(self.sizes[index])
        with torch.no_grad():
            self.set_targets(inputs, self.image.device)
            upsampled = F.interpolate(
                self.image.detach(), size=inputs.content.shape[-2:], mode="bicubic", align_corners=False
            )
        self.image = nn.Parameter(upsampled.contiguous())
        self._scale = index

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step, float32 = self.global_step, self.in_float32_phase()
        if step == self._float32_start():
            detail(f"step {step}: the last {self.trainer.max_steps - step} iterations run in float32 "
                           "(model.float32_final_steps)")  # fmt: skip
        optimizer, evaluations, made = self.optimizers(), [], self.evaluator.count
        # DeviceLBFGS evaluates each point once and reads nothing on the host: neither may the evaluation.
        evaluate = self.evaluator.once if isinstance(optimizer.optimizer, DeviceLBFGS) else self.evaluator

        def closure() -> Tensor:
            evaluations.append(evaluate(self.image, optimizer, step=step, float32=float32))
            return evaluations[-1]["total"]

        try:
            optimizer.step(closure=closure)
        except NumericalError:
            self.evaluator.restore(self.image)  # the last image whose loss was finite is what gets written
            raise
        first = evaluations[0]  # the losses where this step started (L-BFGS's first evaluation), logged a bit later
        if isinstance(optimizer.optimizer, DeviceLBFGS):  # of its last accepted point: the run's result
            first = self.evaluator.kept(first, optimizer.optimizer.accepted_loss())
        self.losses.record(step, step_values(first, self.evaluator.count - made))
        return first["total"].detach()

    def on_losses(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: Any) -> None:
        # Each flush of the lagged losses (losslog.py) reads the device's fault record too: one host read a flush.
        self.evaluator.check(self.image)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # DeviceLBFGS's non-finite evaluations are recorded on the device: at the latest the last step raises them.
        if 0 <= self.trainer.max_steps <= self.global_step or self.trainer.should_stop:
            self.evaluator.check(self.image)

    def output_image(self) -> Tensor:
        """The current image as RGB in [0, 1] (see :meth:`Objective.to_rgb`): under DeviceLBFGS, the last point it
        accepted (:func:`~nst_lightning.lbfgs.last_accepted`)."""
        try:
            optimizers = self.trainer.optimizers
        except RuntimeError:  # not attached to a Trainer
            optimizers = []
        return self.objective.to_rgb(last_accepted(self.image, optimizers))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The frozen extractor comes from the config: keep its weights out of checkpoints."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("objective.extractor.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint made with another image size, other settings or other images."""
        state = upgrade_state_dict(checkpoint.setdefault("state_dict", {}))
        if self.image is not None:  # a coarse-to-fine run saved at a later scale: move there first
            index = saved_scale(state, self.image, [self.images.content_size(size) for size in self.sizes])
            if index is not None:
                self._enter_scale(index)
        check_resume(checkpoint, dict(self.hparams), self.objective)
        state.update({f"objective.extractor.{k}": v for k, v in self.objective.extractor.state_dict().items()})
