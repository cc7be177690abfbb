"""``StyleTransfer``: Gatys et al.'s optimisation as a LightningModule, and nothing but the training loop.

The stylised image is the only trainable tensor, built from the images the data module hands over
(:meth:`StyleTransfer.use_images`); one optimiser step per training step, through a closure. The loss is
:class:`~nst_lightning.core.objective.Objective`'s, each evaluation :class:`~nst_lightning.run.closure.Evaluator`'s,
the size at each step :mod:`~nst_lightning.core.schedule`'s; :mod:`~nst_lightning.run.checks` checks every setting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from nst_lightning import names
from nst_lightning.core import schedule
from nst_lightning.core.backbones import resolve_backbone
from nst_lightning.core.features import FeatureExtractor, Pooling
from nst_lightning.core.inputs import ImageSource, Inputs
from nst_lightning.core.lbfgs import DeviceLBFGS, last_accepted, make_lbfgs
from nst_lightning.core.objective import Objective
from nst_lightning.core.tiles import Tiling, relative_cost
from nst_lightning.errors import ConfigError, NumericalError
from nst_lightning.io.console import detail, note
from nst_lightning.io.image_io import load_image
from nst_lightning.names import (
    AUTO,
    CONTENT_LAYERS,
    LBFGS_HISTORY_SIZE,
    STYLE_LAYERS,
    LineSearch,
    Optimizer,
    PreserveColor,
)
from nst_lightning.run import checks
from nst_lightning.run.checkpoint import check_resume, estimate_checkpoint_bytes, saved_scale, upgrade_state_dict
from nst_lightning.run.closure import Evaluator
from nst_lightning.run.losslog import LossLog, step_values
from nst_lightning.run.plan import plan_run
from nst_lightning.run.precision import SCALE_START, LossScaler, drop_lightning_scaler, float32_start
from nst_lightning.run.runtime import keep_freed_memory, return_freed_memory


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
        lbfgs_line_search: backtrack (the default: nst_lightning.core.lbfgs's L-BFGS, which never waits for
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
        tile_size: run the network's early layers over tiles of this many pixels a side (with a margin that covers
            their receptive field, so the loss and gradient are the whole image's; see docs/print.md), the later
            ones over the whole image where they fit: what lets an image larger than the network's activations
            allow run in the memory at hand. None (the default) tiles only the sizes whose whole image would not
            fit, with the cheapest tiles that fit; 0 never tiles.
    """

    def __init__(
        self,
        content_layers: Sequence[str] = CONTENT_LAYERS,
        style_layers: Sequence[str] = STYLE_LAYERS,
        style_layer_weights: Sequence[float] | None = None,
        content_weight: float = 1.0,
        style_weight: float = 1e6,
        tv_weight: float = 0.0,
        style_loss: names.StyleLoss = "gram",
        preserve_color: PreserveColor = "none",
        backbone: str = AUTO,
        weights: names.NamedWeights | checks.InputPath = "imagenet",
        normalize: bool = True,
        layer_means: dict[str, float] | None = None,
        pooling: Pooling = "max",
        init: names.Init | checks.InputPath = "content",
        seed: int = 0,
        optimizer: Optimizer = "lbfgs",
        lr: float | None = None,
        lbfgs_history_size: int = LBFGS_HISTORY_SIZE,
        lbfgs_line_search: LineSearch | None = "backtrack",
        scales: Sequence[int] | None = None,
        scale_steps: Sequence[int] | None = None,
        compile: bool = False,
        float32_final_steps: int = 50,
        tile_size: int | None = None,
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
            extractor,
            content_layers,
            style_layers,
            style_layer_weights,
            content_weight,
            style_weight,
            tv_weight,
            style_loss,
            preserve_color,
        )
        self.register_parameter("image", None)  # made in setup(), once the content image is known
        self.register_buffer("loss_scale", torch.tensor(SCALE_START))  # 16-mixed's, kept in checkpoints
        self.evaluator = Evaluator(self.objective, self.manual_backward)
        self.images: ImageSource | None = None
        self.sizes: list[int] = []
        self.tiles: list[Tiling | None] = []  # the tiling of each scale (None: the whole image), from the memory
        self.history = lbfgs_history_size  # L-BFGS steps kept: fewer where the memory holds no more (plan.py)
        self.step_costs: list[float] = [1.0]  # each scale's arithmetic a step, relative (see work)
        self._scale = 0  # index into self.sizes
        self._returned_memory = False  # a tight run hands freed memory back until its end (setup, teardown)
        self._start: str | Tensor | None = None  # restart()'s init, else model.init
        self._origin = 0  # the trainer's global step where this image's steps began (see restart)
        self.losses = LossLog()  # each step's losses, kept on the device and logged a few steps later
        if compile:
            self.objective.compile()  # nn.Module.compile: the extractor and the losses, in place

    def use_images(self, source: ImageSource) -> None:
        """Takes the images, at any size, from the data module (its ``setup`` calls this, before ours)."""
        self.images = source

    def restart(self, init: str | Tensor | None = None) -> None:
        """Starts over at the next fit, which may be another fit of the same Trainer (a video's next frame): its
        ``setup`` builds the targets and the image again from the data module's images, the image from ``init`` (an
        init's name, an image file or a (1, 3, H, W) tensor in [0, 1]; None: ``model.init``), and the coarse-to-fine
        schedule counts that fit's steps from its first. The extractor, and style targets that did not change, stay."""
        self.image = None
        self._start = init

    def setup(self, stage: str) -> None:
        """Checks the run, then builds the targets and the image parameter (once, or again after :meth:`restart`)."""
        if self.image is not None:
            return
        if self.images is None:
            raise ConfigError("StyleTransfer needs a StyleTransferDataModule (the data: section of the config)")
        hp, images, extractor = self.hparams, self.images, self.objective.extractor
        device = self.trainer.strategy.root_device
        checks.check_precision(str(self.trainer.precision), device.type, hp.compile)
        drop_lightning_scaler(self.trainer.precision_plugin)
        # A first fit starts at step 0 (a resumed one too: the checkpoint is restored after setup); a later fit of the
        # same Trainer where the one before ended.
        self._origin = self.trainer.global_step
        max_steps = self.trainer.max_steps
        checks.check_schedule(
            hp.scales, hp.scale_steps, images.image_size, max_steps - self._origin if max_steps >= 0 else max_steps
        )
        self.sizes = schedule.sizes(hp.scales, images.image_size)
        # A float32 finish needs the float32 footprint, whatever the rest of the run uses.
        precision = "32-true" if self._float32_start() is not None else str(self.trainer.precision)
        _, self.tiles, self.history = plan_run(images, self.sizes, extractor, hp, precision, device.type)
        if self.history < hp.lbfgs_history_size:
            rank_zero_warn(
                f"the memory at hand holds {self.history} of the {hp.lbfgs_history_size} L-BFGS steps "
                "(model.lbfgs_history_size) at this size: a little slower to converge"
            )
        self.step_costs = []
        for size, tiling in zip(self.sizes, self.tiles, strict=True):
            width, height = images.content_size(size)
            self.step_costs.append(width * height * relative_cost(extractor, height, width, tiling))
        tiled = [f"{size} px over {tiling}" for size, tiling in zip(self.sizes, self.tiles, strict=True) if tiling]
        if tiled:  # a choice made for the user: say it
            note(f"the network runs over tiles (model.tile_size): {', '.join(tiled)}")
        if any(self.tiles) and str(self.trainer.precision) == "16-mixed":  # its loss scaler needs the whole image
            raise ConfigError("trainer.precision 16-mixed cannot run over tiles (model.tile_size): use bf16-mixed")
        if device.type == "cpu" and (any(self.tiles) or self.history < hp.lbfgs_history_size):
            # A tight run hands freed memory back (runtime.return_freed_memory): a kept heap grows past its estimate.
            self._returned_memory = return_freed_memory()
        self.objective.tiling = self.tiles[0]
        inputs = images.inputs(self.sizes[0])
        # setup() runs before Lightning moves the module: the targets are computed where the
        # optimisation will run rather than on the CPU.
        extractor.to(device)
        with torch.no_grad():
            self.set_targets(inputs, device)
        init = hp.init if self._start is None else self._start
        if isinstance(init, Tensor):
            init, init_file = "image", init
        else:
            init_file = load_image(init) if init not in names.INITS else None
        start = self.objective.initial_image(inputs, init, hp.seed, init_file)
        # L-BFGS flattens the gradient with view(): the image must be contiguous.
        self.image = nn.Parameter(start.to(device).contiguous())
        self._scale = 0

    def teardown(self, stage: str) -> None:
        """The heap is kept again after a tight run (a batch's next pair or a video's next frame may fit)."""
        if self._returned_memory:
            self._returned_memory = not keep_freed_memory()

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
        return make_lbfgs(self.image, hp.lr or 1.0, self.history, hp.lbfgs_line_search)

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
        index = schedule.scale_at(self.global_step - self._origin, self.hparams.scale_steps)
        if index != self._scale:
            self._enter_scale(index)
            # A new optimiser: L-BFGS's history (and its cached parameter count) belong to the old size.
            self.trainer.optimizers = [self.configure_optimizers()]

    def _enter_scale(self, index: int) -> None:
        """Moves a coarse-to-fine run to scale ``index``: targets recomputed at the new size, the image
        upsampled into a new parameter."""
        inputs = self.images.inputs(self.sizes[index])
        self.objective.tiling = self.tiles[index]
        # DeviceLBFGS's image holds its next trial: the last accepted point goes on. The old size's L-BFGS
        # history is dropped before the new targets are computed (at print sizes, gigabytes: plan.py).
        image = last_accepted(self.image, self.trainer.optimizers).detach()
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        with torch.no_grad():
            self.set_targets(inputs, image.device)
            upsampled = F.interpolate(image, size=inputs.content.shape[-2:], mode="bicubic", align_corners=False)
        self.image = nn.Parameter(upsampled.contiguous())
        self._scale = index

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step, float32 = self.global_step, self.in_float32_phase()
        if step == self._float32_start():
            detail(
                f"step {step}: the last {self.trainer.max_steps - step} iterations run in float32 "
                "(model.float32_final_steps)"
            )
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

    def work(self, start: int, end: int) -> float:
        """The arithmetic of the trainer's steps ``start`` to ``end - 1``, in pixels a whole evaluation (each step's
        scale's pixels times its tiling's cost): the progress bar's time left, where a coarse-to-fine run's last
        scales cost many times its first's a step."""
        return schedule.work(self.hparams.scale_steps, self.step_costs, start - self._origin, end - self._origin)

    def output_image(self) -> Tensor:
        """The current image as RGB in [0, 1] (see :meth:`Objective.to_rgb`): under DeviceLBFGS, the last point it
        accepted (:func:`~nst_lightning.core.lbfgs.last_accepted`)."""
        try:
            optimizers = self.trainer.optimizers
        except RuntimeError:  # not attached to a Trainer
            optimizers = []
        return self.objective.to_rgb(last_accepted(self.image, optimizers))

    # ---------------------------------------------------------------- what the callbacks ask (run/model.py)

    def current_image(self) -> Tensor | None:
        return self.image

    def final_losses(self) -> dict[str, Tensor]:
        # Over the run's tiles where it has them: the whole image's activations at a print size are what did not fit.
        with torch.no_grad():
            return self.objective.evaluate(self.image, lambda _: None)

    def output_size(self) -> tuple[int, int] | None:
        return None if self.images is None else self.images.content_size()

    def checkpoint_bytes(self, max_steps: int) -> int:
        width, height = self.images.content_size()
        return estimate_checkpoint_bytes(height, width, self.hparams, max_steps)

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
