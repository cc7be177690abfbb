"""The data side: content, style and mask images in, tensors out, and a loader that paces the steps."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import lightning as L
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from nst_lightning import memory
from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.image_io import fit_size, image_size, open_mask, open_rgb, pil_to_float

# An image enlarged by more than this factor to reach its size is reported (it brings no detail).
UPSCALE_REPORTED = 2.0


@dataclass
class Inputs:
    """The images of one optimisation at one size, as float tensors in [0, 1]."""

    content: Tensor
    """(1, 3, H, W), longest side the requested size."""
    styles: list[Tensor]
    """One (1, 3, h, w) tensor per style image, longest side ``style_scale`` x the size."""
    blend: list[float]
    """One weight per style, summing to 1."""
    masks: list[Tensor] | None
    """None, or one (1, 1, H, W) mask per style at the content's size."""


class _PacingLoader(DataLoader):
    """A loader of step indices. It holds no state worth saving (every item is just a tick), so it
    declares itself resumable: a run resumed mid-epoch simply goes on until ``max_steps``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


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
        content: str,
        style: str | list[str],
        image_size: int = 512,
        style_blend_weights: list[float] | None = None,
        style_scale: float = 1.0,
        style_masks: list[str] | None = None,
    ) -> None:
        super().__init__()
        styles = [style] if isinstance(style, str) else list(style)
        if not styles:
            raise ConfigError("data.style is empty: give at least one style image")
        if image_size < 1:
            raise ConfigError(f"data.image_size must be a positive number of pixels, got {image_size}")
        if not (math.isfinite(style_scale) and style_scale > 0):
            raise ConfigError(f"data.style_scale must be a positive number, got {style_scale}")
        blend = [1.0] * len(styles) if style_blend_weights is None else [float(w) for w in style_blend_weights]
        if len(blend) != len(styles):
            raise ConfigError(
                f"data.style_blend_weights has {len(blend)} values for {len(styles)} style images: "
                "give one weight per style"
            )
        if any(not math.isfinite(w) or w < 0 for w in blend) or sum(blend) <= 0:
            raise ConfigError(
                f"data.style_blend_weights must be numbers >= 0 with a positive sum, got {style_blend_weights}"
            )
        if style_masks is not None and len(style_masks) != len(styles):
            raise ConfigError(
                f"data.style_masks has {len(style_masks)} masks for {len(styles)} style images: give one mask per style"
            )
        self.save_hyperparameters()
        self.content = content
        self.styles = styles
        self.image_size = image_size
        self.blend = [w / sum(blend) for w in blend]
        self.style_scale = style_scale
        self.mask_paths = style_masks
        self._content: Image.Image | None = None
        self._styles: list[Image.Image] = []
        self._masks: list[Image.Image] = []

    def setup(self, stage: str) -> None:
        """Reads every image once (the tensors for a size come from :meth:`inputs`)."""
        if self._content is not None:
            return
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
        return image_size(self.content), [image_size(path) for path in self.styles]

    def content_size(self, size: int | None = None) -> tuple[int, int]:
        """(width, height) of the content image (and the output) at longest side ``size`` (default:
        ``image_size``), computed without resizing anything."""
        return fit_size(*self._source_sizes()[0], size or self.image_size)

    def style_sizes(self, size: int | None = None) -> list[tuple[int, int]]:
        """(width, height) of each style image for an output of longest side ``size``."""
        side = max(1, round(self.style_scale * (size or self.image_size)))
        return [fit_size(*source, side) for source in self._source_sizes()[1]]

    def check_sizes(self, size: int | None = None, available: int | None = None) -> None:
        """Refuses, before any image is resized, sizes whose images alone would not fit in the memory
        available (``data.image_size 100000``, ``data.style_scale 10000``): the resize itself would
        otherwise be what runs out (see :func:`~nst_lightning.memory.input_bytes`). The run's own
        estimate (``StyleTransfer.setup``) then applies to the sizes that pass."""
        size = size or self.image_size
        free = available if available is not None else memory.available_bytes("cpu")
        content_bytes, style_bytes = self._input_bytes(size)
        if free is None or content_bytes + style_bytes <= free:
            return
        content, styles = self.content_size(size), self.style_sizes(size)
        if style_bytes > content_bytes and self.style_scale > 1:
            biggest = max(styles, key=lambda wh: wh[0] * wh[1])
            what = f"data.style_scale {self.style_scale:g} makes the style image {biggest[0]}x{biggest[1]} px"
            fix = "lower data.style_scale"
        else:
            what = f"data.image_size {size} makes the content image {content[0]}x{content[1]} px"
            # The bytes grow with the square of the size: start there, then step down to one that fits.
            side = int(size * math.sqrt(free / (content_bytes + style_bytes))) // 16 * 16
            while side >= 16 and sum(self._input_bytes(side)) > free:
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

    def _input_bytes(self, size: int) -> tuple[int, int]:
        return memory.input_bytes(self.content_size(size), self.style_sizes(size))

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
            self.setup("fit")
        size = size or self.image_size
        self.check_sizes(size)  # before any resize allocates
        content_size = self.content_size(size)
        targets = self.style_sizes(size)
        styles = [pil_to_float(_resize(img, target)) for img, target in zip(self._styles, targets, strict=True)]
        masks = [pil_to_float(_resize(mask, content_size)) for mask in self._masks] or None
        return Inputs(pil_to_float(_resize(self._content, content_size)), styles, self.blend, masks)

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


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.Resampling.LANCZOS)
