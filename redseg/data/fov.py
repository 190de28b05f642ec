"""The circular field of view (FOV) of a colour fundus photograph.

A fundus camera images the retina through a round aperture: the photograph is a bright disc on a
dark (usually black) surround. The disc is often cut by the frame, as IDRiD's 4288x2848 frames
cut it at the top and the bottom (the disc is wider than the frame is high), so the FOV is found
by fitting a circle to the disc's boundary points that lie *inside* the frame (the left/right
extremes of each row and the top/bottom extremes of each column, leaving out those on the frame's
edge), never from the bright region's bounding box.

:func:`find_fov` returns a :class:`FieldOfView`: centre, radius, diameter (pixels of the
photograph as given), :meth:`FieldOfView.mask` and ``border``: True when the FOV was found from a
dark border, False when the photograph has none (a fundus picture cropped inside the disc). Then
the FOV is the frame itself, taken as inscribed in the camera's disc: centre the frame's centre,
diameter the frame's diagonal (the smallest circle that contains the frame, a lower bound of the
true disc) and the mask the whole frame.

An image that is not a fundus photograph raises :class:`FovError` (a ValueError) naming the file:
an all-black or uniform image, random noise (no border and no smooth content), or a bright region
on a dark surround that is not a disc.

How (all on the brightest channel, median-filtered against JPEG noise):

* ``bright``: the median of the pixels brighter than ``DARK_MIN``; ``dark``: the median of the four corner
  patches (4 % of the shorter side). A border exists when at least two corners are darker than
  ``max(DARK_MIN, DARK_FRACTION * bright)``.
* Border: the FOV is the largest connected region above ``dark + EDGE_LEVEL * (bright - dark)``;
  a least-squares circle (algebraic fit) through its boundary points inside the frame, refitted
  twice without the points more than 3 median residuals off (a camera's notch, a label). It must
  fit: median residual at most ``MAX_RESIDUAL`` of the radius and the region's area within
  ``AREA_RATIO`` of the fitted circle's area inside the frame.
* No border: the image must not be uniform (standard deviation >= ``MIN_STD`` grey levels) nor
  noise (mean absolute neighbour difference below ``MAX_ROUGHNESS`` of the standard deviation;
  i.i.d. noise gives about 1.13, a photograph far less).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

DARK_MIN = 12.0  # grey level under which a corner is dark whatever the photograph's brightness
DARK_FRACTION = 0.25  # or darker than this share of the central brightness
MIN_BRIGHT = 20.0  # a median of the lit pixels below this: an all-black image
MIN_LIT = 0.05  # share of the pixels above DARK_MIN; fewer: an all-black image
EDGE_LEVEL = 0.2  # FOV threshold between the surround's and the centre's level
MAX_RESIDUAL = 0.02  # median |distance - radius| of the boundary points, as a share of the radius
AREA_RATIO = (0.3, 1.15)  # region area / area of the fitted circle inside the frame (low: a letterboxed, cut disc)
MIN_STD = 3.0  # grey levels; below: a uniform image
MAX_ROUGHNESS = 0.85  # mean |neighbour difference| / std; above: noise (i.i.d. noise ~1.13, tiny fundus crops <= 0.6)
MIN_SIDE = 16  # pixels; a smaller image cannot show a fundus
WORK_SIDE = 1100  # a larger photograph's FOV is found on a copy this long (its diameter to ~0.1 %)


class FovError(ValueError):
    """The image shows no fundus field of view; the message names the file and why."""


@dataclass(frozen=True)
class FieldOfView:
    """A circular field of view in pixel coordinates (pixel centres at integers, x right, y down)."""

    cx: float
    cy: float
    radius: float
    height: int  # the photograph's size
    width: int
    border: bool  # True: found from a dark border; False: no border, the frame is the FOV

    @property
    def diameter(self) -> float:
        return 2.0 * self.radius

    def mask(self) -> np.ndarray:
        """Bool HxW: inside the FOV (the disc inside the frame; the whole frame without a border)."""
        if not self.border:
            return np.ones((self.height, self.width), dtype=bool)
        ys = (np.arange(self.height, dtype=np.float64) - self.cy) ** 2
        xs = (np.arange(self.width, dtype=np.float64) - self.cx) ** 2
        return ys[:, None] + xs[None, :] <= self.radius**2

    def crop_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end exclusive: the FOV's bounding square clipped to the frame."""
        if not self.border:
            return 0, 0, self.width, self.height
        x0 = max(0, int(math.floor(self.cx - self.radius + 0.5)))
        y0 = max(0, int(math.floor(self.cy - self.radius + 0.5)))
        x1 = min(self.width, int(math.ceil(self.cx + self.radius + 0.5)))
        y1 = min(self.height, int(math.ceil(self.cy + self.radius + 0.5)))
        return x0, y0, x1, y1

    def as_dict(self) -> dict:
        return {
            "cx": round(self.cx, 2),
            "cy": round(self.cy, 2),
            "radius": round(self.radius, 2),
            "diameter": round(self.diameter, 2),
            "border": self.border,
        }


def _grey(img: np.ndarray, smooth: bool = True) -> np.ndarray:
    """The brightest channel (the red one of a fundus), median-filtered unless not ``smooth``, uint8."""
    if img.ndim == 3:
        g = img.max(axis=2) if img.shape[2] > 1 else img[..., 0]
    else:
        g = img
    g = np.ascontiguousarray(g)
    if g.dtype != np.uint8:
        g = np.clip(g, 0, 255).astype(np.uint8)
    return cv2.medianBlur(g, 3) if smooth else g


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares circle x^2 + y^2 + D x + E y + F = 0 -> (cx, cy, r)."""
    a = np.column_stack([x, y, np.ones_like(x)])
    b = -(x**2 + y**2)
    (d, e, f), *_ = np.linalg.lstsq(a, b, rcond=None)
    cx, cy = -d / 2.0, -e / 2.0
    r2 = cx * cx + cy * cy - f
    return float(cx), float(cy), float(math.sqrt(r2)) if r2 > 0 else 0.0


def _on_straight_run(ext: np.ndarray, longest: float) -> np.ndarray:
    """Bool per entry: part of a run of equal values longer than ``longest`` (a straight edge)."""
    out = np.zeros(len(ext), dtype=bool)
    start = 0
    for i in range(1, len(ext) + 1):
        if i == len(ext) or ext[i] != ext[start]:
            if i - start > longest:
                out[start:i] = True
            start = i
    return out


def _boundary_points(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary points of ``region`` to fit its circle to, at pixel edges: the left/right extremes of
    each row and the top/bottom extremes of each column, without those on the frame's edge and
    without straight runs (the flat cut of a disc letterboxed inside a black margin). A circle of
    radius r pixels has no run of one row (column) longer than about 2 sqrt(2 r)."""
    h, w = region.shape
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    left = region[rows].argmax(axis=1)
    right = w - 1 - region[rows, ::-1].argmax(axis=1)
    top = region[:, cols].argmax(axis=0)
    bottom = h - 1 - region[::-1, cols].argmax(axis=0)
    r_est = max(int((right - left).max()), int((bottom - top).max())) / 2.0
    longest = 2.5 * math.sqrt(2.0 * max(r_est, 1.0)) + 3.0
    xs, ys = [], []
    for ext, lo_edge, shift in ((left, 0, -0.5), (right, w - 1, 0.5)):
        keep = (ext != lo_edge) & ~_on_straight_run(ext, longest)
        xs.append(ext[keep] + shift)
        ys.append(rows[keep])
    for ext, lo_edge, shift in ((top, 0, -0.5), (bottom, h - 1, 0.5)):
        keep = (ext != lo_edge) & ~_on_straight_run(ext, longest)
        xs.append(cols[keep])
        ys.append(ext[keep] + shift)
    return np.concatenate(xs).astype(np.float64), np.concatenate(ys).astype(np.float64)


def _circle_area_in_frame(cx: float, cy: float, r: float, h: int, w: int) -> float:
    return float(FieldOfView(cx, cy, r, h, w, True).mask().sum())


def find_fov(img_bgr: np.ndarray, name: str = "image") -> FieldOfView:
    """The field of view of a fundus photograph (BGR or grey uint8); FovError naming ``name`` if none."""
    if img_bgr is None or img_bgr.ndim not in (2, 3) or img_bgr.size == 0:
        raise FovError(f"{name}: not an image")
    h, w = img_bgr.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise FovError(f"{name}: {w}x{h} is too small for a fundus photograph (at least {MIN_SIDE}x{MIN_SIDE})")
    if max(h, w) > WORK_SIDE:  # found on a smaller copy (a 4288x2848 photograph: ~0.1 s instead of ~1.3 s)
        k = WORK_SIDE / max(h, w)
        small = cv2.resize(
            img_bgr, (max(MIN_SIDE, round(w * k)), max(MIN_SIDE, round(h * k))), interpolation=cv2.INTER_AREA
        )
        f = find_fov(small, name)
        kx, ky = small.shape[1] / w, small.shape[0] / h
        if not f.border:
            return FieldOfView((w - 1) / 2.0, (h - 1) / 2.0, math.hypot(w, h) / 2.0, h, w, False)
        return FieldOfView((f.cx + 0.5) / kx - 0.5, (f.cy + 0.5) / ky - 0.5, f.radius * 2.0 / (kx + ky), h, w, True)
    g = _grey(img_bgr)
    lit = g[g > DARK_MIN]
    if lit.size < MIN_LIT * g.size:
        raise FovError(f"{name}: the image is (almost) all black: not a fundus photograph")
    bright = float(np.median(lit))
    if bright < MIN_BRIGHT:
        raise FovError(f"{name}: the image is (almost) all black: not a fundus photograph")
    cs = max(2, round(0.04 * min(h, w)))
    corners = [g[:cs, :cs], g[:cs, -cs:], g[-cs:, :cs], g[-cs:, -cs:]]
    corner_levels = np.array([float(np.median(c)) for c in corners])
    dark_limit = max(DARK_MIN, DARK_FRACTION * bright)
    dark_corners = corner_levels < dark_limit
    if dark_corners.sum() < 2:
        return _no_border(_grey(img_bgr, smooth=False), name)
    dark = float(np.median(corner_levels[dark_corners]))
    level = dark + EDGE_LEVEL * (bright - dark)
    above = (g > level).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    if n < 2:
        raise FovError(f"{name}: no bright field of view on the dark surround: not a fundus photograph")
    big = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = labels == big
    x, y = _boundary_points(region)
    if len(x) < 12:
        raise FovError(
            f"{name}: the bright region has no curved edge inside the frame to fit a circle to: not a fundus photograph"
        )
    keep = np.ones(len(x), dtype=bool)
    for _ in range(3):
        cx, cy, r = _fit_circle(x[keep], y[keep])
        res = np.abs(np.hypot(x - cx, y - cy) - r)
        med = float(np.median(res[keep]))
        keep = res <= max(1.0, 3.0 * med)
        if keep.sum() < 12:
            break
    if r <= 0 or not (-r < cx < w + r and -r < cy < h + r):
        raise FovError(f"{name}: the bright region is not a circular field of view")
    med = float(np.median(np.abs(np.hypot(x[keep] - cx, y[keep] - cy) - r)))
    if med > max(1.0, MAX_RESIDUAL * r):
        raise FovError(
            f"{name}: the bright region's edge is not a circle (median misfit {med:.1f} px for radius {r:.1f} px): "
            "not a fundus photograph"
        )
    ratio = float(region.sum()) / max(1.0, _circle_area_in_frame(cx, cy, r, h, w))
    if not AREA_RATIO[0] <= ratio <= AREA_RATIO[1]:
        raise FovError(
            f"{name}: the bright region fills {ratio:.0%} of its fitted circle: not a circular field of view"
        )
    return FieldOfView(cx, cy, r, h, w, True)


def _no_border(g: np.ndarray, name: str) -> FieldOfView:
    h, w = g.shape
    f = g.astype(np.float32)
    std = float(f.std())
    if std < MIN_STD:
        raise FovError(f"{name}: the image is uniform (standard deviation {std:.1f}): not a fundus photograph")
    rough = float((np.abs(np.diff(f, axis=1)).mean() + np.abs(np.diff(f, axis=0)).mean()) / 2.0) / std
    if rough > MAX_ROUGHNESS:
        raise FovError(
            f"{name}: no dark border and no smooth content (neighbour difference {rough:.2f} of the spread): "
            "looks like noise, not a fundus photograph"
        )
    return FieldOfView((w - 1) / 2.0, (h - 1) / 2.0, math.hypot(w, h) / 2.0, h, w, False)


def fov_mask(img_bgr: np.ndarray, name: str = "image") -> np.ndarray:
    """Bool HxW: the pixels inside the photograph's field of view (FovError if it has none)."""
    return find_fov(img_bgr, name).mask()


def fov_summary(diameters: Sequence[float | None]) -> tuple[float | None, str]:
    """The training data's FOV diameter from per-image ones (None: not measured) and how it was got:
    the median of the measured ones (robust to an odd image), None when none was measured."""
    found = [float(d) for d in diameters if d is not None]
    if not found:
        return None, f"no field of view found in any of {len(diameters)} training images (redseg.data.fov)"
    med = float(np.median(found))
    return round(med, 2), (
        f"median over {len(found)} of {len(diameters)} training images at prepared size, before augmentation "
        f"(redseg.data.fov.find_fov; range {min(found):.1f}-{max(found):.1f} px)"
    )
