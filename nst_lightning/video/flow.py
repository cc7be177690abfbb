"""Optical flow between frames (OpenCV's DIS), warping by it, Ruder et al.'s reliability mask, and flicker.

Conventions: images are (H, W, 3) uint8 or float arrays; a flow ``f`` from frame A to frame B is (H, W, 2)
float32 with ``A(x) ~ B(x + f(x))`` (OpenCV's ``calc(A, B)``). The *backward* flow of frame t is the flow from
t to t-1: warping frame t-1 by it gives frame t's view of it.
"""

from __future__ import annotations

import cv2
import numpy as np

# Ruder et al. (2016), section 3.2: the forward-backward consistency and motion-boundary thresholds.
CONSISTENCY_RELATIVE, CONSISTENCY_ABSOLUTE = 0.01, 0.5
BOUNDARY_RELATIVE, BOUNDARY_ABSOLUTE = 0.01, 0.002


def optical_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The dense flow (H, W, 2) from RGB ``first`` to RGB ``second`` (uint8), by OpenCV's DIS (medium preset).

    Departure from the paper: Ruder et al. used DeepFlow and EpicFlow (external binaries); DIS is in
    ``opencv-python-headless``, needs no learned weights and takes milliseconds per frame pair."""
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    a = cv2.cvtColor(np.ascontiguousarray(first), cv2.COLOR_RGB2GRAY)
    b = cv2.cvtColor(np.ascontiguousarray(second), cv2.COLOR_RGB2GRAY)
    return dis.calc(a, b, None).astype(np.float32)


def _sample_map(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = flow.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return xs + flow[..., 0], ys + flow[..., 1]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` (the earlier frame) resampled at ``x + flow(x)`` (bilinear; edges repeated): with the
    backward flow of frame t, frame t-1 as frame t sees it. Keeps the dtype (uint8 rounds)."""
    map_x, map_y = _sample_map(flow)
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def reliability(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Ruder et al.'s per-pixel weight c of frame t (H, W) float32: 0 where the flow cannot be trusted, else 1.

    ``forward`` is the flow from t-1 to t, ``backward`` from t to t-1. A pixel is dropped where (1) the two
    disagree, ``|f~ + b|^2 > 0.01 (|f~|^2 + |b|^2) + 0.5`` with ``f~`` the forward flow warped into frame t
    (disocclusion), (2) it lies on a motion boundary, ``|grad b_x|^2 + |grad b_y|^2 > 0.01 |b|^2 + 0.002``, or
    (3) its backward flow leaves the frame (a departure: the paper does not say; such pixels have no
    previous value, only the edge repeated)."""
    h, w = backward.shape[:2]
    map_x, map_y = _sample_map(backward)
    forward_here = cv2.remap(forward, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    total = forward_here + backward
    disagree = (total**2).sum(-1) > CONSISTENCY_RELATIVE * ((forward_here**2).sum(-1) + (backward**2).sum(-1)) + (
        CONSISTENCY_ABSOLUTE
    )
    grad_sq = np.zeros((h, w), np.float32)
    for channel in range(2):
        gy, gx = np.gradient(backward[..., channel])
        grad_sq += gx**2 + gy**2
    boundary = grad_sq > BOUNDARY_RELATIVE * (backward**2).sum(-1) + BOUNDARY_ABSOLUTE
    outside = (map_x < 0) | (map_x > w - 1) | (map_y < 0) | (map_y > h - 1)
    return (~(disagree | boundary | outside)).astype(np.float32)


def flicker(current: np.ndarray, previous: np.ndarray, backward: np.ndarray, mask: np.ndarray) -> float:
    """The flicker of frame t: the mean absolute difference between ``current`` and ``previous`` (frame t-1)
    warped by ``backward`` (t to t-1), over the pixels where ``mask`` (H, W) is positive, in the images'
    own units (0-255 for uint8). NaN when no pixel counts."""
    warped = warp(previous.astype(np.float32), backward)
    difference = np.abs(current.astype(np.float32) - warped).mean(-1)
    chosen = mask > 0
    return float(difference[chosen].mean()) if chosen.any() else float("nan")
