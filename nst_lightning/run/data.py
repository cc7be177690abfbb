"""The data side: content, style and mask images in, tensors at any size out, handed to the module.

:class:`StyleTransferDataModule` reads each image once (in ``setup``) and then hands itself, as an
:class:`ImageSource`, to the module being fitted: the module asks it for the images at each size of a
coarse-to-fine run, and never looks for its data anywhere else. Its loader only paces the steps (the
image is the model; there is nothing to batch).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from nst_lightning.core.inputs import ImageSource, Inputs
from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.io.image_io import RGBImage, fit_size, open_mask, open_rgb, resized
from nst_lightning.io.image_io import image_size as header_size
from nst_lightning.run import runtime
from nst_lightning.run.checks import InputPath, check_data, plain

# An image enlarged by more than this factor to reach its size is reported (it brings no detail).
UPSCALE_REPORTED = 2.0
# Bytes per pixel to prepare one input image: the resized 8-bit RGB image and Pillow's intermediate
# (it resizes one axis at a time), the float32 tensor, and the extractor's normalised copy of it.
PREPARE_BYTES_PER_PIXEL = 3 + 3 + 4 * 3 + 4 * 3
# The same for a mask (one channel): 8-bit in and out of the resize, then float32.
MASK_BYTES_PER_PIXEL = 1 + 1 + 4


@runtime_checkable
class ImageConsumer(Protocol):
    """A module that takes its images from the data module (``StyleTransfer``)."""

    def use_images(self, source: ImageSource) -> None: ...


class _PacingLoader(DataLoader):
    """A loader of step indices. It holds no state worth saving (every item is just a tick), so it
    declares itself resumable: a run resumed mid-epoch simply goes on until ``max_steps``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _content_size(source: tuple[int, int], size: int) -> tuple[int, int]:
    return fit_size(*source, size)


def _style_sizes(sources: Sequence[tuple[int, int]], size: int, style_scale: float) -> list[tuple[int, int]]:
    side = max(1, round(style_scale * size))
    return [fit_size(*source, side) for source in sources]


def input_bytes(content: tuple[int, int], styles: Sequence[tuple[int, int]], masks: int = 0) -> tuple[int, int]:
    """Bytes to prepare the input images, (content and ``masks`` masks at its size, styles), from their (width,
    height) once resized, in the CPU's memory on any device (Pillow resizes there). A lower bound of what a run
    needs, cheap to compute for any size: the guard against absurd sizes (``data.image_size 1000000000``),
    for which :func:`nst_lightning.run.memory.check_fits` would spend its time looking for a size that fits."""
    content_bytes = content[0] * content[1] * (PREPARE_BYTES_PER_PIXEL + masks * MASK_BYTES_PER_PIXEL)
    style_bytes = sum(w * h * PREPARE_BYTES_PER_PIXEL for w, h in styles)
    return content_bytes, style_bytes


def check_sizes(
    content: tuple[int, int],
    styles: Sequence[tuple[int, int]],
    size: int,
    style_scale: float,
    available: int | None = None,
    masks: int = 0,
) -> None:
    """Refuses, before any image is resized, sizes whose images alone would not fit in the memory
    available (``data.image_size 100000``, ``data.style_scale 10000``): the resize itself would
    otherwise be what runs out (see :func:`input_bytes`). ``content`` and ``styles`` are the images' (width,
    height) as read; ``masks`` the number of style masks. The run's own estimate (``StyleTransfer.setup``)
    then applies to the sizes that pass."""
    free = available if available is not None else runtime.available_bytes("cpu")

    def needs(side: int) -> tuple[int, int]:
        return input_bytes(_content_size(content, side), _style_sizes(styles, side, style_scale), masks)

    content_bytes, style_bytes = needs(size)
    if free is None or content_bytes + style_bytes <= free:
        return
    if style_bytes > content_bytes and style_scale > 1:
        biggest = max(_style_sizes(styles, size, style_scale), key=lambda wh: wh[0] * wh[1])
        what = f"data.style_scale {style_scale:g} makes the style image {biggest[0]}x{biggest[1]} px"
        fix = "lower data.style_scale"
    else:
        width, height = _content_size(content, size)
        what = f"data.image_size {size} makes the content image {width}x{height} px"
        # The bytes grow with the square of the size: start there, then step down to one that fits.
        side = int(size * math.sqrt(free / (content_bytes + style_bytes))) // 16 * 16
        while side >= 16 and sum(needs(side)) > free:
            side -= 16
        fix = (
            f"lower data.image_size: the images alone fit up to about {side} (the run needs more; its "
            "estimate names a size that fits)"
            if side >= 16
            else "no image size fits: free memory first"
        )
    gib = 2**30
    raise ConfigError(
        f"{what}: about {(content_bytes + style_bytes) / gib:,.1f} GiB just to prepare the images, but "
        f"{free / gib:,.1f} GiB of memory is available: {fix}"
    )


def check_files_fit(
    *, content: str, style: str | list[str], image_size: int, style_scale: float, style_masks: list | None = None, **_
) -> None:
    """:func:`check_sizes` for the ``data:`` settings, from the files' headers (nothing is decoded)."""
    styles = [style] if isinstance(style, str) else list(style)
    masks = len(style_masks or [])
    check_sizes(header_size(content), [header_size(path) for path in styles], image_size, style_scale, masks=masks)


class StyleTransferDataModule(L.LightningDataModule):
    """Loads the content, style and mask images and paces the optimisation.

    Args:
        content: path of the content image (the photo whose layout is kept).
        style: path of the style image, or a list of paths to blend several styles.
        image_size: pixels on the longest side of the output; the content's aspect ratio is kept.
        style_blend_weights: one weight per style image (normalised to sum 1; default: equal).
        style_scale: the style images are resized to style_scale x image_size on their longest side
            (smaller values give larger brush strokes relative to the output, larger values finer).
        style_masks: one mask image per style (the content image's size, white where that style
            applies); pixels outside every mask get the content loss only.
    """

    def __init__(
        self,
        content: InputPath,
        style: list[InputPath] | InputPath,
        image_size: int = 512,
        style_blend_weights: list[float] | None = None,
        style_scale: float = 1.0,
        style_masks: list[InputPath] | None = None,
    ) -> None:
        super().__init__()
        content, style, style_masks = plain(content), plain(style), plain(style_masks)
        check_data(
            style=style,
            image_size=image_size,
            style_blend_weights=style_blend_weights,
            style_scale=style_scale,
            style_masks=style_masks,
        )
        self.save_hyperparameters()
        styles = [style] if isinstance(style, str) else list(style)
        blend = [1.0] * len(styles) if style_blend_weights is None else [float(w) for w in style_blend_weights]
        self.content = content
        self.styles = styles
        self.image_size = image_size
        self.blend = [w / sum(blend) for w in blend]
        self.style_scale = style_scale
        self.mask_paths = style_masks
        self._content: RGBImage | None = None
        self._styles: list[RGBImage] = []
        self._masks: list[RGBImage] = []

    def setup(self, stage: str) -> None:
        """Reads every image once, then hands this data module to the module being fitted (see
        :class:`ImageConsumer`): from here on, the module asks it for the images at each size."""
        if self._content is None:
            self._read()
        module = self.trainer.lightning_module if self.trainer is not None else None
        if isinstance(module, ImageConsumer):
            module.use_images(self)

    def set_content(self, content: InputPath) -> None:
        """Another content image of the same size (a video's next frame) for the next fit; the style images and
        masks stay as they were read."""
        self.content = plain(content)
        self.hparams["content"] = self.content
        if self._content is not None:
            self._content = open_rgb(self.content)

    def _read(self) -> None:
        self._content = open_rgb(self.content)
        self._styles = [open_rgb(path) for path in self.styles]
        self._masks = [open_mask(path) for path in self.mask_paths or []]
        for path, mask in zip(self.mask_paths or [], self._masks, strict=True):
            if mask.size != self._content.size:
                raise ImageError(
                    f"mask {path} is {mask.size[0]}x{mask.size[1]} px but the content image is "
                    f"{self._content.size[0]}x{self._content.size[1]}: give masks of the content image's size"
                )
        self._report_upscaling()

    def _source_sizes(self) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """(width, height) of the content and style images as read: from the decoded images once
        :meth:`setup` has run, else from the files' headers (nothing decoded)."""
        if self._content is not None:
            return self._content.size, [img.size for img in self._styles]
        return header_size(self.content), [header_size(path) for path in self.styles]

    @property
    def mask_count(self) -> int:
        """The number of style masks."""
        return len(self.mask_paths or [])

    def content_size(self, size: int | None = None) -> tuple[int, int]:
        """(width, height) of the content image (and the output) at longest side ``size`` (default:
        ``image_size``), computed without resizing anything."""
        return _content_size(self._source_sizes()[0], size or self.image_size)

    def style_sizes(self, size: int | None = None, style_scale: float | None = None) -> list[tuple[int, int]]:
        """(width, height) of each style image for an output of longest side ``size`` (at ``style_scale``,
        default: the data module's)."""
        return _style_sizes(self._source_sizes()[1], size or self.image_size, style_scale or self.style_scale)

    def check_sizes(self, size: int | None = None, available: int | None = None) -> None:
        """:func:`check_sizes` for these images at longest side ``size`` (default: ``image_size``)."""
        content, styles = self._source_sizes()
        check_sizes(content, styles, size or self.image_size, self.style_scale, available, self.mask_count)

    def _report_upscaling(self) -> None:
        """One warning naming the images enlarged by more than :data:`UPSCALE_REPORTED` to reach
        their size (a 1x1 image, a thumbnail): the output gets no detail from them."""
        (content_w, content_h), sources = self._content.size, [img.size for img in self._styles]
        targets = [("content", self.content, (content_w, content_h), self.content_size())]
        targets += [
            ("style", path, source, target)
            for path, source, target in zip(self.styles, sources, self.style_sizes(), strict=True)
        ]
        enlarged = [
            f"the {which} image {path} ({source[0]}x{source[1]} px) to {target[0]}x{target[1]} px"
            for which, path, source, target in targets
            if max(target) > UPSCALE_REPORTED * max(source)
        ]
        if enlarged:
            warnings.warn(
                f"upscaling {'; '.join(enlarged)}: an enlarged image brings no detail of its own; give larger "
                "images, or a smaller data.image_size (data.style_scale for a style image)",
                stacklevel=2,
            )

    def inputs(self, size: int | None = None) -> Inputs:
        """The images for an output whose longest side is ``size`` (default: ``image_size``)."""
        if self._content is None:
            self._read()
        size = size or self.image_size
        self.check_sizes(size)  # before any resize allocates
        content_size = self.content_size(size)
        styles = [resized(img, target) for img, target in zip(self._styles, self.style_sizes(size), strict=True)]
        masks = [resized(mask, content_size) for mask in self._masks] or None
        return Inputs(resized(self._content, content_size), styles, self.blend, masks)

    @property
    def content_image(self) -> Tensor:
        """The content image at ``image_size``, (1, 3, H, W)."""
        return self.inputs().content

    @property
    def style_image(self) -> Tensor:
        """The (first) style image at ``image_size`` x ``style_scale``, (1, 3, h, w)."""
        return self.inputs().styles[0]

    def train_dataloader(self) -> DataLoader:
        """One item per optimisation step: the image is the model, so the loader only paces the loop.

        One epoch spans the whole run (``trainer.max_steps`` items) so the progress bar shows it.
        """
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        return _PacingLoader(range(max(max_steps, 1)), batch_size=None)
