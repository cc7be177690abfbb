"""Video files in and out with PyAV: probing and checks, decoding to frames, encoding H.264 or a PNG sequence.

The output keeps the input's frame count, frame rate and display size; a rotated input (a phone's display
matrix) is decoded upright, so the output shows the same picture without the flag. The first audio stream
is copied packet for packet, never re-encoded. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from nst_lightning.errors import ImageError
from nst_lightning.io.files import new_mode
from nst_lightning.video import VIDEO_SUFFIXES

# A frame interval may differ from 1/rate by this fraction (timestamps rounded to the time base) and still
# count as a constant frame rate.
RATE_TOLERANCE = 0.05
# Containers that PyAV opens but that hold still images, not video.
IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "gif", "bmp_pipe", "tiff_pipe")


@dataclass
class VideoInfo:
    """What a video holds, as checked by :func:`probe`."""

    path: Path
    width: int
    """Display width (after rotation)."""
    height: int
    rate: Fraction
    """Frames per second (constant)."""
    frames: int
    rotation: int
    """Degrees the stored frames are turned counterclockwise for display (0, 90, 180, -90)."""
    audio: str | None
    """The first audio stream's codec, or None."""


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist: give the path of a video file") from None
    except (av.FFmpegError, OSError, ValueError) as err:
        raise ImageError(
            f"{path} is not a video PyAV can read ({' '.join(str(err).split())}): give an MP4, MOV, MKV or WebM file"
        ) from None
    try:
        if container.format.name in IMAGE_FORMATS:
            raise ImageError(f"{path} is a still image, not a video: stylise it with nst-lightning {path} STYLE")
        yield container
    finally:
        container.close()


def _stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise ImageError(f"{path} has no video stream (only {len(container.streams)} other stream(s)): give a video")
    return container.streams.video[0]


def _decoded(container: av.container.InputContainer, path: Path) -> Iterator[av.VideoFrame]:
    stream = _stream(container, path)
    stream.thread_type = "AUTO"
    try:
        yield from container.decode(stream)
    except av.FFmpegError as err:
        raise ImageError(f"{path}: the video cannot be decoded ({' '.join(str(err).split())}): re-encode it") from None


def probe(path: str | os.PathLike) -> VideoInfo:
    """Reads every frame's timestamp (decoding the video once) and checks what :mod:`.frames` relies on: a
    video stream with at least one frame at a constant frame rate. An :class:`ImageError` names what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a folder: give a video file")
    with _opened(path) as container:
        stream = _stream(container, path)
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        times: list[Fraction] = []
        count, rotation, size, tick = 0, 0, (0, 0), Fraction(0)
        for frame in _decoded(container, path):
            if count == 0:
                rotation, size = int(round(frame.rotation or 0)), (frame.width, frame.height)
            count += 1
            if frame.pts is not None and frame.time_base is not None:
                times.append(frame.pts * frame.time_base)
                tick = Fraction(frame.time_base)
        if count == 0:
            raise ImageError(f"{path} has a video stream but no frames: give a video with at least one frame")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if len(times) >= 2:
            intervals = [b - a for a, b in zip(times, times[1:], strict=False)]
            if not rate or rate <= 0:
                rate = Fraction(len(intervals)) / (times[-1] - times[0])
            expected = 1 / Fraction(rate)
            worst = max(abs(interval - expected) for interval in intervals)
            if worst > max(RATE_TOLERANCE * expected, tick):
                shortest, longest = min(intervals), max(intervals)
                raise ImageError(
                    f"{path} has a variable frame rate (frames {float(shortest) * 1000:.1f} to "
                    f"{float(longest) * 1000:.1f} ms apart): re-encode it at a constant rate first "
                    "(ffmpeg -i IN -vf fps=30 OUT.mp4)"
                )
        if not rate:
            rate = Fraction(25)
        rate = Fraction(rate).limit_denominator(1001 * 1000)
        width, height = size
        if rotation % 180:
            width, height = height, width
        return VideoInfo(path, width, height, rate, count, rotation, audio)


def decode_frames(info: VideoInfo, size: tuple[int, int], each: Callable[[int, np.ndarray], None]) -> None:
    """Decodes every frame of ``info``'s video upright, resized to ``size`` (width, height; Lanczos), and calls
    ``each(index, rgb)`` with an (H, W, 3) uint8 array, in order."""
    quarter_turns = (info.rotation // 90) % 4
    stored = size if quarter_turns % 2 == 0 else (size[1], size[0])
    with _opened(info.path) as container:
        for index, frame in enumerate(_decoded(container, info.path)):
            rgb = frame.reformat(width=stored[0], height=stored[1], format="rgb24", interpolation="LANCZOS")
            pixels = rgb.to_ndarray()
            if quarter_turns:  # the display matrix turns the picture counterclockwise
                pixels = np.ascontiguousarray(np.rot90(pixels, k=quarter_turns))
            each(index, pixels)


def _temporary(path: Path) -> Path:
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    return Path(name)


def encode_video(
    frames: Iterator[np.ndarray], info: VideoInfo, output: Path, copy_audio: bool = True, crf: int = 18
) -> None:
    """Writes ``frames`` ((H, W, 3) uint8 at the display size) as H.264 to ``output`` (.mp4, .mov or .mkv) at
    ``info``'s frame rate, with ``info``'s first audio stream copied unchanged; through a temporary file
    renamed at the end, so ``output`` is never half-written, with an image's permissions (a new file's under the
    umask)."""
    container_format = VIDEO_SUFFIXES[output.suffix.lower()]
    temporary = _temporary(output)
    try:
        with av.open(str(temporary), "w", format=container_format) as out:
            stream = out.add_stream("libx264", rate=info.rate)
            stream.width, stream.height = info.width, info.height
            # 4:2:0 chroma needs even sides: an odd-sized input keeps its size with full chroma instead.
            stream.pix_fmt = "yuv420p" if info.width % 2 == 0 and info.height % 2 == 0 else "yuv444p"
            stream.options = {"crf": str(crf)}
            stream.codec_context.time_base = 1 / info.rate
            audio = _copy_audio(info.path, out, output) if copy_audio and info.audio else None
            for index, pixels in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                frame.pts, frame.time_base = index, 1 / info.rate
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
            del audio
        os.chmod(temporary, new_mode())  # as an image is written (0644 under the usual umask), not mkstemp's 0600
        os.replace(temporary, output)
    except av.FFmpegError as err:
        raise ImageError(f"cannot write {output}: {' '.join(str(err).split())} (nothing was written)") from None
    finally:
        temporary.unlink(missing_ok=True)


def _copy_audio(source: Path, out: av.container.OutputContainer, output: Path) -> object:
    """Copies the first audio stream of ``source`` into ``out`` packet for packet (muxed first: audio is
    small, and the muxer interleaves it with the video as that comes)."""
    with av.open(str(source)) as container:
        stream = container.streams.audio[0]
        try:
            copied = out.add_stream_from_template(stream)
        except (av.FFmpegError, ValueError) as err:
            raise ImageError(
                f"the audio of {source} ({stream.codec_context.name}) cannot go into {output.suffix}: "
                f"{' '.join(str(err).split())}; try OUT ending in .mkv"
            ) from None
        for packet in container.demux(stream):
            if packet.dts is None:  # the demuxer's empty packet at the end
                continue
            packet.stream = copied
            out.mux(packet)
        return copied


def write_png_sequence(frames: Iterator[np.ndarray], output: Path, save: Callable[[np.ndarray, Path], None]) -> int:
    """Writes ``frames`` as ``frame_000001.png``... into the new folder ``output``: into a temporary folder
    beside it first, renamed to ``output`` once every frame is written (with a new folder's permissions under the
    umask, as the frames have a new file's). Returns the number of frames."""
    temporary = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        count = 0
        for index, pixels in enumerate(frames):
            save(pixels, temporary / f"frame_{index + 1:06d}.png")
            count += 1
        os.chmod(temporary, new_mode(folder=True))  # 0755 under the usual umask, not mkdtemp's 0700
        if output.is_dir():  # --overwrite: the old folder goes only once the new one is complete
            old = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".old"))
            os.replace(output, old / output.name)
            os.replace(temporary, output)
            shutil.rmtree(old)
        else:
            os.replace(temporary, output)
        return count
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
