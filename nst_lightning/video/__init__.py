"""Video stylisation with temporal consistency (Ruder, Dosovitskiy & Brox 2016): ``nst-lightning video``.

The rooms: :mod:`.media` (PyAV: probe, decode, encode, audio copy), :mod:`.flow` (OpenCV's DIS optical flow,
warping, the reliability masks, the flicker measure), :mod:`.frames` (the work folder and the per-frame
Lightning runs, resumable) and :mod:`.command` (the command line). Nothing in the core imports this package:
PyAV and OpenCV are the optional ``video`` extra (``pip install -e ".[video]"``).
"""
