#!/usr/bin/env python
"""Contact sheet: a grid of settings (columns) x content/style pairs (rows), each cell a real run.

Every cell is :class:`nst_lightning.StyleTransfer` under a real ``Trainer`` on the CPU, with the
settings of its column on top of the defaults (or of ``--base``). The sheet is one PNG with a column
of inputs (content and style) and each cell labelled with its final loss; a JSON beside it holds
every cell's settings, losses and wall time. Cells are kept in ``--cells`` and reused when a sheet is
made again with the same settings, so a sheet can be extended or re-laid-out without re-running.

    python benchmarks/contact_sheet.py --weights ../shared/weights/vgg16_imagenet_keras.pth \\
        --backbone vgg16 --size 256 --steps 150 -o docs/studies/style_weight.png \\
        --setting "style 1e5" style_weight=1e5 --setting "style 1e6" style_weight=1e6

``--setting LABEL KEY=VALUE ...``: KEY is a ``model.`` or ``data.`` key (``model.`` may be left out),
VALUE is read as YAML (``[relu1_1, relu2_1]``, ``1e6``, ``avg``). Without ``--setting`` one column of
the defaults is made. ``--pair CONTENT:STYLE`` takes names of the shipped samples
(``tubingen:starry_night``) or paths; the default is every shipped content with every shipped style.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, even where another copy is installed
SAMPLES = REPO / "nst_lightning" / "samples"
CELL = 256  # the longest side of a cell on the sheet, in pixels (--cell)


def sample(name: str, kind: str) -> Path:
    """A shipped sample by short name (``tubingen``, ``starry_night``) or a path as it is."""
    path = SAMPLES / f"{kind}_{name}.jpg"
    return path if path.is_file() else Path(name)


def default_pairs() -> list[tuple[Path, Path]]:
    contents = sorted(SAMPLES.glob("content_*.jpg"))
    styles = sorted(SAMPLES.glob("style_*.jpg"))
    return [(content, style) for content in contents for style in styles]


def parse_setting(items: list[str]) -> tuple[str, dict[str, dict]]:
    """``["relu", "content_layers=[relu4_2]"]`` -> ("relu", {"model": {...}, "data": {...}})."""
    import yaml

    label, overrides = items[0], {"model": {}, "data": {}}
    for item in items[1:]:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        overrides[section or "model"][name] = _number(yaml.safe_load(value))
    return label, overrides


def _number(value):
    """YAML 1.1 reads ``1e6`` as a string; a number is meant."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def run_cell(content: Path, style: Path, model: dict, data: dict, steps: int, precision: str) -> dict:
    """One optimisation; returns the image (a tensor), its losses and the wall time."""
    import torch
    from lightning import Callback, Trainer

    from nst_lightning.run.data import StyleTransferDataModule
    from nst_lightning.run.module import StyleTransfer

    class Losses(Callback):
        def __init__(self) -> None:
            self.history: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.history.append(float(outputs["loss"]))

    losses = Losses()
    start = time.perf_counter()
    module = StyleTransfer(**model)
    datamodule = StyleTransferDataModule(str(content), str(style), **data)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[losses],
    )
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        final = {name: float(value) for name, value in module(module.image).items()}
    return {
        "image": module.output_image(),
        "losses": final,
        "history": losses.history,
        "seconds": seconds,
        "steps": trainer.global_step,
    }


def label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def thumbnail(path_or_image, side: int):
    from PIL import Image

    image = Image.open(path_or_image).convert("RGB") if isinstance(path_or_image, Path) else path_or_image
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def compose(
    columns: list[str], rows: list[tuple[Path, Path]], cells: dict, title: str, path: Path, side: int = CELL
) -> None:
    """The sheet: a header row of column labels, then per pair the inputs and one cell per column.
    A ``.jpg`` path is written as a JPEG (quality 75)."""
    from PIL import Image, ImageDraw

    pad, header, caption = 8, 40, 22
    width = pad + (side // 2 + pad) + len(columns) * (side + pad)
    height = header + pad + len(rows) * (side + caption + pad) + 24
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    big, small = label_font(16), label_font(12)
    draw.text((pad, 4), title, fill="black", font=small)
    for j, label in enumerate(columns):
        draw.text((pad + side // 2 + pad + j * (side + pad), 20), label, fill="black", font=big)
    for i, (content, style) in enumerate(rows):
        top = header + pad + i * (side + caption + pad)
        sheet.paste(thumbnail(content, side // 2), (pad, top))
        sheet.paste(thumbnail(style, side // 2), (pad, top + side // 2 + 4))
        for j, label in enumerate(columns):
            cell = cells.get((label, i))
            left = pad + side // 2 + pad + j * (side + pad)
            if cell is None:
                continue
            image = thumbnail(cell["image"], side)
            sheet.paste(image, (left, top))
            text = f"loss {cell['losses']['total']:.4g} ({cell['seconds']:.0f} s)"
            draw.text((left, top + image.height + 4), text, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, **({"quality": 75, "optimize": True} if path.suffix.lower() in (".jpg", ".jpeg") else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="imagenet", help="model.weights of every cell")
    parser.add_argument("--backbone", default=None, help="model.backbone of every cell (default: the module's)")
    parser.add_argument("--size", type=int, default=256, help="data.image_size of every cell (default 256)")
    parser.add_argument("--steps", type=int, default=150, help="L-BFGS iterations per cell (default 150)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="settings of every column")
    parser.add_argument("--setting", nargs="+", action="append", metavar=("LABEL", "KEY=VALUE"), help="a column")
    parser.add_argument("--pair", action="append", help="CONTENT:STYLE (sample names or paths); repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", default="outputs/contact_cells", help="folder of cached cells")
    parser.add_argument("--cell", type=int, default=CELL, help="longest side of a cell on the sheet (px)")
    parser.add_argument("--cached-only", action="store_true", help="lay out the cells made so far; run none")
    parser.add_argument("-o", "--output", required=True, help="the sheet (PNG); its JSON goes beside it")
    args = parser.parse_args()

    import torch
    from PIL import Image

    from nst_lightning.io.image_io import save_image
    from nst_lightning.run.runtime import keep_freed_memory

    keep_freed_memory()  # as cli.py does
    torch.set_num_threads(args.threads)
    _, base = parse_setting(["base", *args.base])
    base["model"].setdefault("weights", args.weights)
    if args.backbone:
        base["model"].setdefault("backbone", args.backbone)
    base["data"].setdefault("image_size", args.size)
    settings = [parse_setting(items) for items in args.setting or [["default"]]]
    rows = (
        [(sample(c, "content"), sample(s, "style")) for c, s in (p.split(":") for p in args.pair)]
        if args.pair
        else default_pairs()
    )
    cache = Path(args.cells)
    cache.mkdir(parents=True, exist_ok=True)
    cells, record = {}, []
    for label, overrides in settings:
        model, data = {**base["model"], **overrides["model"]}, {**base["data"], **overrides["data"]}
        for i, (content, style) in enumerate(rows):
            spec = {
                "model": model,
                "data": data,
                "steps": args.steps,
                "precision": args.precision,
                "content": str(content),
                "style": str(style),
            }
            key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
            png, meta = cache / f"{key}.png", cache / f"{key}.json"
            if png.is_file() and meta.is_file():
                cell = json.loads(meta.read_text()) | {"image": Image.open(png).convert("RGB")}
            elif args.cached_only:
                continue
            else:
                print(f"{label}: {content.stem} x {style.stem} ...", flush=True)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run_cell(content, style, model, data, args.steps, args.precision)
                save_image(result.pop("image"), png)
                meta.write_text(json.dumps(spec | result, indent=1))
                cell = spec | result | {"image": Image.open(png).convert("RGB")}
                print(f"   loss {result['losses']['total']:.5g} in {result['seconds']:.0f} s", flush=True)
            cells[(label, i)] = cell
            record.append({"label": label, **{k: v for k, v in cell.items() if k != "image"}})
    output = Path(args.output)
    title = (
        f"weights {Path(args.weights).name}, {base['model'].get('backbone', 'vgg19')}, {args.size} px, "
        f"{args.steps} L-BFGS iterations, {args.precision}; base {args.base or 'defaults'}"
    )
    compose([label for label, _ in settings], rows, cells, title, output, args.cell)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
