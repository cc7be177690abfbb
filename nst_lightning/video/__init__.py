"""Video stylisation with temporal consistency (Ruder, Dosovitskiy & Brox 2016): ``nst-lightning video``.

The rooms: :mod:`.command` (the command line and the checks on OUT: light, for ``--help`` and mistakes at once),
:mod:`.run` (the run: probe, work folder, module, segments over processes, OUT), :mod:`.frames` (the work folder and
the frames' runs through one Trainer, resumable), :mod:`.media` (PyAV: probe, decode, encode, audio copy) and
:mod:`.flow` (OpenCV's DIS optical flow, warping, the reliability masks, the flicker measure). Nothing in the core
imports this package: PyAV and OpenCV are the optional ``video`` extra (``pip install -e ".[video]"``).
"""

VIDEO_SUFFIXES = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
"""Output file endings and their container: H.264 video (any other OUT without an ending is a PNG folder)."""
EXTRAS = ("av", "cv2")
"""The modules of the ``video`` extra: PyAV and OpenCV."""


class Stopped(Exception):
    """An interruption between or inside frames, with its line and exit status (see
    :func:`nst_lightning.main.cli_main`); the finished frames are kept for the next run."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
