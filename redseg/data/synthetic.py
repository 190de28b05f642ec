"""Synthetic colour fundus photographs with exact red-lesion masks, in the official IDRiD layout.

Why: IDRiD (paper section 3.1) cannot be shipped with the project, yet the tools, the tests and
the demo need images that look like fundus photographs and carry microaneurysm (MA) and
haemorrhage (HE) ground truth. This module draws such images from a seed and writes them exactly
as the official archive lays out its segmentation part (docs/data_format.md), so that
``tools/prepare_idrid.py`` and ``tools/evaluate.py --gt`` treat them like the real thing:

``<out>/A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_NN.jpg`` and
``<out>/A. Segmentation/2. All Segmentation Groundtruths/<split>/<n. Lesion>/IDRiD_NN_<L>.tif``.

What is drawn (all geometry in units of the fundus radius, so an image looks the same at any size
and the same seed gives the same picture at every size):

* a round fundus disc, cut at the top and bottom like IDRiD's 4288x2848 frames, on a black
  surround; orange-red background brighter in the centre (vignetting, green and blue fall off
  faster than red towards the rim) with low-frequency choroidal texture and sensor grain;
* a bright yellowish optic disc with a paler cup, on the nasal side; a darker macula with a fovea;
* a branching vessel tree leaving the optic disc: temporal arcades curving around the macula,
  nasal vessels, small macular branches; veins darker and wider than arteries, tapering;
* MA: small round dark-red dots of radius ``ma_radius`` (full-size pixels; by default 6-9 px at
  1072 px width, scaled with the width, so that after the paper's 4x downsampling they are about
  1.5-2.3 px in radius), kept off vessels, the optic disc and other lesions;
* HE: larger irregular dark-red blotches (several merged blobs with a noisy rim) and flame-shaped
  ones lying along a vessel, elongated in its direction and streaked;
* EX (in some images): small yellow hard-exudate clusters near the macula.

Masks are exact: each lesion is drawn as an opacity map ``alpha`` in [0, 1] that blends the
background towards the lesion colour, and the mask is exactly ``alpha >= 0.5`` (the pixels
darkened by at least half of the lesion's full strength). Masks are written as 3-channel colour
TIFFs with lesion pixels (0, 0, 255) in OpenCV's BGR order (red, like IDRiD's). As in IDRiD a
lesion type absent from an image has no mask file: about ``no_he_fraction`` (20 %) of the images
of each split have no haemorrhage and no ``_HE.tif``; every image has MA and an optic-disc mask
(``_OD.tif``), images with exudates an ``_EX.tif``; there are never soft exudates (no ``_SE.tif``).

Generation is vectorised (numpy/OpenCV); only the vessel random walk and the per-lesion patches
are Python loops over a few thousand steps.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from redseg.config import (
    IDRID_GT_DIR,
    IDRID_IMAGES_DIR,
    IDRID_LESION_DIRS,
    IDRID_SEG_DIR,
    IDRID_SPLIT_DIRS,
    TEST_IDS,
    TRAIN_IDS,
)
from redseg.fileio import building_dir, read_json_object, write_image, write_json

log = logging.getLogger(__name__)

REFERENCE_WIDTH = 1072  # the paper's working width (4288 / 4); default sizes are tuned at it
DEFAULT_MA_RADIUS_AT_REF = (6.0, 9.0)  # full-size px at 1072 px width -> 1.5-2.25 px after 4x
# The fundus radius as a share of the image width, drawn per image (IDRiD: ~3500 px of 4288, the
# disc cut at the top and bottom): its mean 0.415 gives the reference FOV diameter 2 x 0.415 x 1072
# = 889.8 px, at which every default lesion size is tuned.
DEFAULT_FOV_RADIUS = (0.405, 0.425)
REFERENCE_FOV_DIAMETER = (DEFAULT_FOV_RADIUS[0] + DEFAULT_FOV_RADIUS[1]) * REFERENCE_WIDTH  # 889.76 px
MARKER = "synthetic.json"  # written last at the root of a generated tree; marks it as ours
GENERATOR_STAMP = "redseg.synthetic"  # its "generator": a data-format stamp, kept as trees on disk carry it
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticParams:
    """What a synthetic image looks like. Pixel sizes are full-size (before any downsampling)."""

    width: int = REFERENCE_WIDTH
    height: int = 712
    # (min, max) MA radius in full-size pixels; None: DEFAULT_MA_RADIUS_AT_REF x size_scale(), >= 1 px.
    ma_radius: tuple[float, float] | None = None
    ma_count: tuple[int, int] = (5, 25)  # per image, inclusive
    he_count: tuple[int, int] = (1, 8)  # per image that has haemorrhages, inclusive
    no_he_fraction: float = 0.2  # share of each split without any haemorrhage (no _HE.tif)
    ex_fraction: float = 0.3  # share of images (random per image) with hard exudates
    jpeg_quality: int = 95
    # (min, max) fundus radius as a share of the width, drawn per image; None: DEFAULT_FOV_RADIUS
    # (IDRiD). When set, every lesion size scales with the mean FOV diameter instead of the width
    # (size_scale), so a lesion keeps its size relative to the FOV whatever the frame; a FOV wider
    # than the frame is cut by it (redseg/data/synthetic_layouts.py's cameras use this).
    fov_radius: tuple[float, float] | None = None

    def size_scale(self) -> float:
        """Lesion sizes (tuned at the reference FOV) are multiplied by this: the width / 1072 by
        default, else the mean FOV diameter / REFERENCE_FOV_DIAMETER."""
        if self.fov_radius is None:
            return self.width / REFERENCE_WIDTH
        return self.width * (self.fov_radius[0] + self.fov_radius[1]) / REFERENCE_FOV_DIAMETER

    def resolved_ma_radius(self) -> tuple[float, float]:
        if self.ma_radius is not None:
            lo, hi = self.ma_radius
        else:
            k = self.size_scale()
            lo, hi = DEFAULT_MA_RADIUS_AT_REF[0] * k, DEFAULT_MA_RADIUS_AT_REF[1] * k
        lo = max(1.0, float(lo))  # below 1 px a dot has no pixel with alpha >= 0.5
        return lo, max(lo, float(hi))

    def validate(self) -> None:
        if self.width < 16 or self.height < 16:
            raise ValueError(f"image size {self.width}x{self.height} is too small (>= 16x16)")
        for name in ("ma_count", "he_count"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be 0 <= min <= max, got {lo},{hi}")
        if self.he_count[0] < 1:
            raise ValueError("he_count min must be >= 1 (images without HE come from no_he_fraction)")
        if not 0.0 <= self.no_he_fraction <= 1.0 or not 0.0 <= self.ex_fraction <= 1.0:
            raise ValueError("no_he_fraction and ex_fraction must lie in [0, 1]")
        lo, hi = self.ma_radius if self.ma_radius is not None else (1.0, 1.0)
        if not 0 < lo <= hi:
            raise ValueError(f"ma_radius must be 0 < min <= max, got {lo},{hi}")
        lo, hi = self.fov_radius if self.fov_radius is not None else DEFAULT_FOV_RADIUS
        if not 0.1 <= lo <= hi <= 1.0:
            raise ValueError(f"fov_radius must be 0.1 <= min <= max <= 1 (shares of the width), got {lo},{hi}")


@dataclass
class SyntheticImage:
    """One rendered photograph: BGR uint8 image and boolean masks of the lesions present."""

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # "MA", "HE", "EX", "OD" -> bool HxW
    counts: dict[str, int] = field(default_factory=dict)  # lesions drawn per type


# --------------------------------------------------------------------------------------------------
# small helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise: a ``cells`` grid of normals, bicubically upsampled.

    The grid size does not depend on ``shape``, so the same draws give the same pattern at any size.
    """
    g = rng.standard_normal(cells).astype(np.float32)
    h, w = shape
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _angle(v: np.ndarray) -> float:
    return math.atan2(float(v[1]), float(v[0]))


def _wrap(a: float) -> float:
    return (a + math.pi) % (2 * math.pi) - math.pi


def _patch(cx: float, cy: float, half: float, w: int, h: int) -> tuple[int, int, int, int] | None:
    """Integer bounds (x0, x1, y0, y1) of a square of half-size ``half`` around (cx, cy), clipped."""
    x0, x1 = max(0, int(math.floor(cx - half))), min(w, int(math.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(math.floor(cy - half))), min(h, int(math.ceil(cy + half)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, x1, y0, y1


# --------------------------------------------------------------------------------------------------
# the vessel tree


@dataclass
class _Segment:
    p0: np.ndarray
    p1: np.ndarray
    width: float  # in units of the fundus radius
    vein: bool


def _grow_vessel(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    width: float,
    target: float,
    turn: float,
    budget: float,
    vein: bool,
    depth: int,
    fovea: np.ndarray,
    out: list[_Segment],
) -> None:
    """Random walk of one vessel (units of the fundus radius, origin at the fundus centre).

    The heading relaxes towards ``target`` at rate ``turn`` per step (this bends the temporal
    arcades around the macula) plus a slowly varying curvature (tortuosity). The vessel tapers,
    spawns thinner branches at random and stops when too thin, out of the disc, too close to the
    fovea (the foveal avascular zone) or after ``budget`` length.
    """
    step = 0.0075
    p = start.astype(np.float64).copy()
    kappa = 0.0
    length = 0.0
    w_min = 0.0026
    branch_every = (0.17, 0.2, 0.25, 0.3)[depth]  # mean length between branches
    while width > w_min and length < budget:
        kappa = 0.93 * kappa + rng.normal(0.0, 0.007)
        heading = heading + turn * _wrap(target - heading) + kappa
        q = p + step * np.array([math.cos(heading), math.sin(heading)])
        out.append(_Segment(p, q, width, vein))
        p = q
        length += step
        width *= math.exp(-step / (2.4 if depth == 0 else 1.2))
        if np.hypot(*p) > 1.02 or np.hypot(*(p - fovea)) < 0.08 + 0.02 * rng.random():
            return
        if depth < 3 and length > 0.06 and rng.random() < step / branch_every:
            side = 1.0 if rng.random() < 0.5 else -1.0
            child_heading = heading + side * math.radians(rng.uniform(25, 70))
            child_width = width * rng.uniform(0.45, 0.7)
            width *= rng.uniform(0.9, 0.97)
            _grow_vessel(
                rng,
                p,
                child_heading,
                child_width,
                child_heading - side * rng.uniform(0.0, 0.5),
                rng.uniform(0.0, 0.015),
                budget=rng.uniform(0.25, 0.75) * (1.0, 0.7, 0.45)[depth],
                vein=vein,
                depth=depth + 1,
                fovea=fovea,
                out=out,
            )


def _vessel_tree(rng: np.random.Generator, od: np.ndarray, fovea: np.ndarray, side: float) -> list[_Segment]:
    """Main trunks from the optic disc (``side`` = +1: disc right of the fovea, temporal is -x)."""
    t = np.array([-side, 0.0])  # temporal direction (towards the fovea)
    up, down = np.array([0.0, -1.0]), np.array([0.0, 1.0])
    segs: list[_Segment] = []
    trunks = []  # (start direction, target direction, turn rate, width, budget, vein)
    for vert in (up, down):
        for vein, w0 in ((True, 0.022), (False, 0.016)):
            # temporal arcade: leaves the disc almost vertically, curves round the macula
            d0 = _unit(vert + t * rng.uniform(0.15, 0.45))
            tgt = _unit(t - vert * rng.uniform(0.15, 0.3))
            trunks.append((d0, tgt, rng.uniform(0.018, 0.028), w0, rng.uniform(1.6, 2.0), vein))
            # nasal vessel
            d0 = _unit(vert - t * rng.uniform(0.5, 1.2))
            tgt = _unit(-t + vert * rng.uniform(0.1, 0.5))
            trunks.append((d0, tgt, rng.uniform(0.006, 0.015), w0 * 0.75, rng.uniform(0.6, 0.9), vein))
    for _ in range(int(rng.integers(2, 5))):  # small vessels straight out nasally / to the macula
        d0 = _unit(t * rng.choice([-1.0, 1.0]) + up * rng.uniform(-0.4, 0.4))
        trunks.append((d0, d0, 0.01, rng.uniform(0.007, 0.01), rng.uniform(0.3, 0.6), bool(rng.random() < 0.5)))
    for d0, tgt, turn, w0, budget, vein in trunks:
        start = od + d0 * rng.uniform(0.005, 0.02)
        _grow_vessel(rng, start, _angle(d0), w0, _angle(tgt), turn, budget, vein, 0, fovea, segs)
    return segs


def _draw_vessels(segs: list[_Segment], to_px, scale: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Coverage maps (float32 0..1) of veins and arteries, anti-aliased by 2x supersampling."""
    ss = 2
    shift = 3
    k = ss * (1 << shift)
    maps = []
    for vein in (True, False):
        canvas = np.zeros((h * ss, w * ss), np.uint8)
        for s in segs:
            if s.vein != vein:
                continue
            width_px = s.width * scale * ss
            thick = max(1, int(round(width_px)))
            value = 255 if width_px >= 1 else int(round(255 * width_px))
            a, b = to_px(s.p0), to_px(s.p1)
            cv2.line(
                canvas,
                (int(round(a[0] * k)), int(round(a[1] * k))),
                (int(round(b[0] * k)), int(round(b[1] * k))),
                value,
                thick,
                cv2.LINE_AA,
                shift,
            )
        cov = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        maps.append(cov)
    return maps[0], maps[1]


# --------------------------------------------------------------------------------------------------
# lesions


def _blot_alpha(rng: np.random.Generator, radius: float, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Irregular blob: a few merged Gaussian blobs with a noisy rim; ``gx, gy`` offsets in px."""
    f = np.zeros(gx.shape, np.float32)
    for _ in range(int(rng.integers(2, 6))):
        ox, oy = rng.normal(0, 0.3 * radius, 2)
        sx, sy = radius * rng.uniform(0.5, 0.85, 2)
        f += 0.6 * np.exp(-(((gx - ox) / sx) ** 2) - ((gy - oy) / sy) ** 2).astype(np.float32)
    f = np.minimum(f, 1.2) * (1.0 + 0.12 * _smooth_noise(rng, gx.shape, (5, 5)))
    f *= 1.0 + 0.1 * _smooth_noise(rng, gx.shape, (11, 11))  # ragged rim
    edge = max(0.6, 0.1 * radius)  # soft rim, in px (field slope ~ 1/radius)
    return np.clip((f - 0.5) * radius / edge + 0.5, 0, 1)


def _blot_at(rng: np.random.Generator, x: float, y: float, radius: float, half: float, w: int, h: int):
    """A blot of ``radius`` centred at (x, y): its patch bounds and alpha, or None off the image."""
    b = _patch(x, y, half, w, h)
    if b is None:
        return None
    x0, x1, y0, y1 = b
    gx, gy = np.meshgrid(np.arange(x0, x1) - x, np.arange(y0, y1) - y)
    return b, _blot_alpha(rng, radius, gx.astype(np.float32), gy.astype(np.float32))


def _flame_alpha(
    rng: np.random.Generator, length: float, width: float, angle: float, gx: np.ndarray, gy: np.ndarray
) -> np.ndarray:
    """Flame-shaped haemorrhage: elongated along ``angle``, streaked, with ragged ends."""
    c, s = math.cos(angle), math.sin(angle)
    u = gx * c + gy * s  # along the nerve fibres / vessel
    v = -gx * s + gy * c  # across
    # streaks: the length varies across the flame (1D noise along v), feathered ends
    nv = np.interp(v, np.linspace(-1.5 * width, 1.5 * width, 13), rng.normal(0, 1, 13)).astype(np.float32)
    shift = np.interp(v, np.linspace(-1.5 * width, 1.5 * width, 5), rng.normal(0, 0.15, 5)) * length
    half = length * (1 + 0.25 * nv)
    uu = u - shift
    # a flame: blunt at one end, feathered at the other
    taper = np.where(uu > 0, 1.0, 0.6)
    f = np.exp(-((uu / (half * taper)) ** 2) - (v / width) ** 2).astype(np.float32)
    edge = max(0.6, 0.12 * width)
    return np.clip((f - 0.5) * width / edge + 0.5, 0, 1)


def _sample_points(
    rng: np.random.Generator, n: int, centre: np.ndarray, sigma: float, forbidden: np.ndarray, margin: float
) -> np.ndarray:
    """Up to ``n`` points (x, y px) near ``centre``, off ``forbidden`` and ``margin`` px apart."""
    h, w = forbidden.shape
    cand = rng.normal(0, sigma, (max(64, 40 * n), 2)) + centre
    xi, yi = np.round(cand[:, 0]).astype(int), np.round(cand[:, 1]).astype(int)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    cand, xi, yi = cand[ok], xi[ok], yi[ok]
    cand = cand[~forbidden[yi, xi]]
    chosen: list[np.ndarray] = []
    for p in cand:
        if len(chosen) == n:
            break
        if all(np.hypot(*(p - q)) >= margin for q in chosen):
            chosen.append(p)
    return np.array(chosen).reshape(-1, 2)


# --------------------------------------------------------------------------------------------------
# the photograph


def render_fundus(rng: np.random.Generator, params: SyntheticParams, with_he: bool = True) -> SyntheticImage:
    """Draw one fundus photograph (BGR uint8) and the exact boolean masks of its lesions."""
    w, h = params.width, params.height
    # --- geometry (units of the fundus radius R, origin at the disc centre) ---
    cx = w / 2 + rng.normal(0, 0.008 * w)
    cy = h / 2 + rng.normal(0, 0.008 * h)
    radius = w * rng.uniform(*(params.fov_radius or DEFAULT_FOV_RADIUS))  # IDRiD: cut at top and bottom

    def sized(c: float) -> float:  # a size tuned at the reference FOV, in this image's pixels
        return c * w / REFERENCE_WIDTH if params.fov_radius is None else c * params.size_scale()

    def to_px(p: np.ndarray) -> tuple[float, float]:
        return cx + p[0] * radius, cy + p[1] * radius

    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: optic disc on the right
    od = np.array([side * rng.uniform(0.62, 0.72), rng.uniform(-0.12, 0.02)])
    fovea = np.array([-side * rng.uniform(0.0, 0.08), od[1] + rng.uniform(0.03, 0.12)])
    od_r = rng.uniform(0.125, 0.145)  # optic disc radius: ~1/2.5 of the disc-fovea distance

    xs = (np.arange(w, dtype=np.float32) - cx) / radius
    ys = (np.arange(h, dtype=np.float32) - cy) / radius
    X, Y = np.meshgrid(xs, ys)
    r = np.sqrt(X**2 + Y**2)
    px = 1.0 / radius  # one pixel in units of R
    disc = np.clip((1.0 - r) / (1.2 * px) + 0.5, 0, 1)  # anti-aliased fundus edge

    # --- background: vignetting, colour, texture ---
    centre_bgr = np.array([rng.uniform(18, 42), rng.uniform(88, 125), rng.uniform(188, 228)], np.float32)
    light = np.array([rng.normal(0, 0.1), rng.normal(0, 0.1)])  # off-centre illumination
    rl = np.sqrt((X - light[0]) ** 2 + (Y - light[1]) ** 2)
    fall = np.stack(
        [1 - 0.62 * np.minimum(rl, 1.3) ** 2.0, 1 - 0.58 * np.minimum(rl, 1.3) ** 2.4, 1 - 0.42 * rl**3.0],
        axis=-1,
    )
    bg = centre_bgr * np.clip(fall, 0.15, 1.0)
    tex_lo = _smooth_noise(rng, (h, w), (10, 14))
    tex_mid = _smooth_noise(rng, (h, w), (34, 50))
    fine = cv2.GaussianBlur(rng.standard_normal((h, w), dtype=np.float32), (0, 0), max(0.5, sized(1.2)))
    tex = 1 + 0.035 * tex_lo + 0.025 * tex_mid + 0.05 * fine
    bg *= tex[..., None]
    # choroidal warmth: redder and slightly darker in patches
    chor = _smooth_noise(rng, (h, w), (18, 26))
    bg[..., 1] *= 1 - 0.04 * np.clip(chor, 0, None)
    # macula: darker, browner; fovea a little darker still
    fx, fy = fovea
    dm2 = (X - fx) ** 2 + (Y - fy) ** 2
    mac = np.exp(-dm2 / (2 * 0.2**2)) * rng.uniform(0.22, 0.32) + np.exp(-dm2 / (2 * 0.045**2)) * 0.12
    bg *= (1 - mac[..., None] * np.array([1.1, 1.0, 0.55], np.float32)).clip(0.2, 1)

    # --- optic disc: yellowish, pale cup, soft edge ---
    ox, oy = od
    ang = rng.uniform(0, math.pi)
    ca, sa = math.cos(ang), math.sin(ang)
    du, dv = (X - ox) * ca + (Y - oy) * sa, -(X - ox) * sa + (Y - oy) * ca
    e = rng.uniform(0.88, 1.0)
    d_od = np.sqrt((du / od_r) ** 2 + (dv / (od_r * e)) ** 2)
    od_alpha = np.clip((1 - d_od) / 0.16 + 0.5, 0, 1)
    od_col = np.array([rng.uniform(70, 100), rng.uniform(150, 180), rng.uniform(235, 255)], np.float32)
    od_col = od_col * (1 + 0.06 * tex_mid[..., None])
    cup_c = od + np.array([-side * 0.25 * od_r, rng.normal(0, 0.1) * od_r])
    d_cup = np.sqrt((X - cup_c[0]) ** 2 + (Y - cup_c[1]) ** 2) / (od_r * rng.uniform(0.35, 0.5))
    cup = np.clip(1 - d_cup, 0, 1) ** 0.7
    od_img = np.minimum(od_col + cup[..., None] * np.array([95, 70, 10], np.float32), 255)
    glow = np.exp(-(d_od**2) / (2 * 1.2**2))  # peripapillary halo
    bg = bg * (1 + 0.12 * glow[..., None] * np.array([0.5, 0.7, 0.25], np.float32))
    img = bg * (1 - od_alpha[..., None]) + od_img * od_alpha[..., None]
    base = img.copy()  # background before vessels: lesion colours are relative to it

    # --- vessels ---
    segs = _vessel_tree(rng, od, fovea, side)
    vein, artery = _draw_vessels(segs, lambda p: to_px(p), radius, w, h)
    blur = max(0.3, sized(0.45))
    vein = cv2.GaussianBlur(vein, (0, 0), blur)
    artery = cv2.GaussianBlur(artery, (0, 0), blur)
    vein_f = np.array([0.62, 0.42, 0.60], np.float32)  # multiplicative (B, G, R) at full coverage
    art_f = np.array([0.80, 0.62, 0.84], np.float32)
    img = img * (1 - vein[..., None] * (1 - vein_f)) * (1 - artery[..., None] * (1 - art_f))
    vessels = np.maximum(vein, artery)

    masks: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    scale = sized(1.0)  # lesion sizes other than MA scale with the width (or the FOV, see fov_radius)
    inside = (r < 0.9) & (d_od > 1.35)
    forbidden_he = ~inside | (np.sqrt(dm2) < 0.05)

    # --- haemorrhages ---
    he_alpha = np.zeros((h, w), np.float32)
    he_strength = np.zeros((h, w), np.float32)
    if with_he:
        n_he = int(rng.integers(params.he_count[0], params.he_count[1] + 1))
        n_flame = int(rng.binomial(n_he, 0.4))
        fov_px = np.array(to_px(fovea))
        blots = _sample_points(rng, n_he - n_flame, fov_px, 0.4 * radius, forbidden_he, 40 * scale)
        placed = 0
        for x, y in blots:
            rad = rng.uniform(8, 26) * scale * (1.6 if rng.random() < 0.2 else 1.0)
            blot = _blot_at(rng, x, y, rad, 2.2 * rad + 2, w, h)
            if blot is None:
                continue
            (x0, x1, y0, y1), a = blot
            he_alpha[y0:y1, x0:x1] = np.maximum(he_alpha[y0:y1, x0:x1], a)
            placed += 1
        # flames: next to a medium vessel in the posterior pole, along it
        cand = [
            s for s in segs if 0.004 < s.width < 0.016 and np.hypot(*s.p0) < 0.8 and np.hypot(*(s.p0 - od)) > 1.6 * od_r
        ]
        for _ in range(n_flame):
            if not cand:
                break
            s = cand[int(rng.integers(len(cand)))]
            d = s.p1 - s.p0
            ang_v = _angle(d)
            nrm = _unit(np.array([-d[1], d[0]])) * rng.choice([-1.0, 1.0])
            ln = rng.uniform(18, 45) * scale
            wd = rng.uniform(5, 10) * scale
            cxy = np.array(to_px(s.p0)) + nrm * (s.width * radius * 0.5 + 0.4 * wd)
            b = _patch(cxy[0], cxy[1], 1.6 * ln + 2, w, h)
            if b is None:
                continue
            x0, x1, y0, y1 = b
            gx, gy = np.meshgrid(np.arange(x0, x1) - cxy[0], np.arange(y0, y1) - cxy[1])
            a = _flame_alpha(rng, ln, wd, ang_v + rng.normal(0, 0.12), gx.astype(np.float32), gy.astype(np.float32))
            a *= inside[y0:y1, x0:x1]
            he_alpha[y0:y1, x0:x1] = np.maximum(he_alpha[y0:y1, x0:x1], a)
            placed += 1
        he_mask = he_alpha >= 0.5
        if placed and he_mask.any():
            masks["HE"] = he_mask
            counts["HE"] = placed
        else:
            he_alpha[:] = 0
        mottle = _smooth_noise(rng, (h, w), (40, 60))
        he_strength = np.clip(0.88 + 0.1 * mottle, 0.7, 1.0)
    he_col = base * np.array([0.42, 0.30, 0.52], np.float32)  # dark red, obscures the vessels
    a = (he_alpha * he_strength)[..., None]
    img = img * (1 - a) + he_col * a

    # --- hard exudates: yellow, clustered near the macula (some images only) ---
    taken = cv2.dilate((he_alpha > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if rng.random() < params.ex_fraction:
        ex_alpha = np.zeros((h, w), np.float32)
        n_cl = int(rng.integers(1, 4))
        centres = _sample_points(
            rng,
            n_cl,
            np.array(to_px(fovea)),
            0.3 * radius,
            forbidden_he | taken | (vessels > 0.2),
            30 * scale,
        )
        for ccx, ccy in centres:
            for _ in range(int(rng.integers(3, 12))):
                x, y = np.array([ccx, ccy]) + rng.normal(0, 12 * scale, 2)
                rad = max(0.8, rng.uniform(2.0, 6.0) * scale)
                blot = _blot_at(rng, x, y, rad, 2 * rad + 2, w, h)
                if blot is None:
                    continue
                (x0, x1, y0, y1), a = blot
                a *= ~(taken[y0:y1, x0:x1] | ~inside[y0:y1, x0:x1])
                ex_alpha[y0:y1, x0:x1] = np.maximum(ex_alpha[y0:y1, x0:x1], a)
        ex_mask = ex_alpha >= 0.5
        if ex_mask.any():
            ex_col = np.array([90, 220, 245], np.float32) * (0.75 + 0.25 * (1 - r.clip(0, 1)))[..., None]
            img = img * (1 - ex_alpha[..., None]) + ex_col * ex_alpha[..., None]
            masks["EX"] = ex_mask
            counts["EX"] = int(cv2.connectedComponents(ex_mask.astype(np.uint8))[0] - 1)
            taken |= ex_alpha > 0

    # --- microaneurysms: small round dark-red dots, off vessels, disc and other lesions ---
    r_lo, r_hi = params.resolved_ma_radius()
    near_vessel = cv2.dilate((vessels > 0.08).astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2) > 0
    ma_forbidden = forbidden_he | taken | near_vessel | (r > 0.85)
    n_ma = int(rng.integers(params.ma_count[0], params.ma_count[1] + 1))
    pts = _sample_points(rng, n_ma, np.array(to_px(fovea)), 0.38 * radius, ma_forbidden, 2 * r_hi + 4 * max(1.0, scale))
    ma_alpha = np.zeros((h, w), np.float32)
    ma_strength = np.zeros((h, w), np.float32)
    for x, y in pts:
        rad = rng.uniform(r_lo, r_hi)
        b = _patch(x, y, rad + 2, w, h)
        if b is None:
            continue
        x0, x1, y0, y1 = b
        gx, gy = np.meshgrid(np.arange(x0, x1) - x, np.arange(y0, y1) - y)
        d = np.sqrt(gx**2 + gy**2).astype(np.float32)
        edge = max(1.0, 0.3 * rad)  # blurred rim like a real dot, mask = alpha >= 0.5 <=> d <= rad
        a = np.clip((rad - d) / edge + 0.5, 0, 1)
        ma_alpha[y0:y1, x0:x1] = np.maximum(ma_alpha[y0:y1, x0:x1], a)
        ma_strength[y0:y1, x0:x1] = np.where(a > 0, rng.uniform(0.75, 1.0), ma_strength[y0:y1, x0:x1])
    ma_mask = ma_alpha >= 0.5
    masks["MA"] = ma_mask
    counts["MA"] = len(pts)
    ma_col = base * np.array([0.40, 0.30, 0.55], np.float32)
    a = (ma_alpha * ma_strength)[..., None]
    img = img * (1 - a) + ma_col * a

    masks["OD"] = (od_alpha >= 0.5) & (disc >= 0.5)

    # --- sensor grain, fundus edge, 8 bit ---
    grain = rng.standard_normal((h, w, 3), dtype=np.float32) * 1.6
    img = (img + grain) * disc[..., None]
    img = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    for k in masks:
        masks[k] &= disc >= 0.5
    return SyntheticImage(img, masks, counts)


# --------------------------------------------------------------------------------------------------
# the IDRiD tree


def image_ids(n_train: int, n_test: int) -> tuple[list[int], list[int]]:
    """Consecutive ids like IDRiD: train 1..n_train, test n_train+1..n_train+n_test.

    With the defaults (54, 27) these are exactly config.TRAIN_IDS and config.TEST_IDS.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test < 1:
        raise ValueError(f"need at least one image (n_train={n_train}, n_test={n_test})")
    train = list(range(1, n_train + 1))
    test = list(range(n_train + 1, n_train + n_test + 1))
    if (n_train, n_test) == (len(TRAIN_IDS), len(TEST_IDS)):
        assert tuple(train) == TRAIN_IDS and tuple(test) == TEST_IDS
    return train, test


def image_name(i: int) -> str:
    return f"IDRiD_{i:02d}"


def _no_he_ids(ids: list[int], fraction: float, seed: int, split_code: int) -> set[int]:
    """Which ids of one split get no haemorrhage: round(fraction x n) of them, at least one when
    fraction > 0 and the split has >= 2 images, never all of them when fraction < 1."""
    n = len(ids)
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    if fraction < 1 and n >= 1:
        k = min(k, n - 1)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7, split_code]))
    return {ids[j] for j in rng.permutation(n)[:k]}


def _params_dict(params: SyntheticParams) -> dict:
    """The parameters as recorded in synthetic.json; fov_radius only when set, so a default IDRiD
    tree's marker (and its "already generated" check) is what it was before the field existed."""
    d = asdict(params)
    if d["fov_radius"] is None:
        del d["fov_radius"]
    return d


def _bgr_tiff(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape + (3,), np.uint8)
    out[mask, 2] = 255  # red in RGB viewers, like IDRiD's masks
    return out


def _write(path: Path, arr: np.ndarray, params: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, arr, params or ())


def existing_tree(out: Path, settings: dict, force: bool) -> dict | None:
    """The marker of an identical tree already at ``out`` (keep it), None to (re)build; raises
    FileExistsError for anything that must not be replaced."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    marker = out / MARKER
    old = read_json_object(marker)
    if old is not None and old.get("settings") == json.loads(json.dumps(settings)) and not force:
        log.info("already generated: %s (same settings)", out)
        return old
    if not force:
        what = "a synthetic set with other settings" if old is not None else "not a synthetic set"
        raise FileExistsError(f"{out} exists ({what}); use --force to replace a synthetic set")
    if old is None or old.get("generator") != GENERATOR_STAMP:
        raise FileExistsError(f"{out} exists and is not a synthetic set: refusing to delete it")
    return None


def generate_idrid_tree(
    out: str | Path,
    n_train: int = len(TRAIN_IDS),
    n_test: int = len(TEST_IDS),
    seed: int = 0,
    params: SyntheticParams | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write a synthetic data set in the official IDRiD segmentation layout under ``out``.

    Same seed and parameters -> byte-identical files. Written into ``<out>.partial-<pid>`` and
    renamed at the end, with ``synthetic.json`` (parameters, per-image lesion counts) written last;
    an existing complete tree with the same parameters is kept ("already generated"). Anything else
    at ``out`` is refused unless ``force``, and even then only a tree of ours (with synthetic.json)
    or an empty folder is replaced. Returns the contents of synthetic.json.
    """
    from tqdm import tqdm

    params = params or SyntheticParams()
    params.validate()
    out = Path(out)
    train_ids, test_ids = image_ids(n_train, n_test)
    settings = {
        "format": FORMAT_VERSION,
        "seed": int(seed),
        "n_train": n_train,
        "n_test": n_test,
        "params": {**_params_dict(params), "ma_radius_resolved": list(params.resolved_ma_radius())},
    }
    old = existing_tree(out, settings, force)
    if old is not None:
        return old

    no_he = _no_he_ids(train_ids, params.no_he_fraction, seed, 0) | _no_he_ids(test_ids, params.no_he_fraction, seed, 1)
    images = {}
    jobs = [("train", i) for i in train_ids] + [("test", i) for i in test_ids]
    with building_dir(out) as tmp:
        seg = tmp / IDRID_SEG_DIR
        for split, i in tqdm(jobs, desc="synthetic", unit="img", disable=not progress):
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            syn = render_fundus(rng, params, with_he=i not in no_he)
            name = image_name(i)
            _write(
                seg / IDRID_IMAGES_DIR / IDRID_SPLIT_DIRS[split] / f"{name}.jpg",
                syn.image,
                [cv2.IMWRITE_JPEG_QUALITY, params.jpeg_quality],
            )
            for lesion, mask in syn.masks.items():
                _write(
                    seg / IDRID_GT_DIR / IDRID_SPLIT_DIRS[split] / IDRID_LESION_DIRS[lesion] / f"{name}_{lesion}.tif",
                    _bgr_tiff(mask),
                )
            images[name] = {
                "split": split,
                "lesions": syn.counts,
                "pixels": {k: int(m.sum()) for k, m in syn.masks.items()},
            }
        info = {
            "generator": GENERATOR_STAMP,
            "layout": "idrid",  # as every synthetic tree's marker (redseg/data/synthetic_layouts.py)
            "counts": {"train": n_train, "test": n_test},
            "settings": settings,
            "images": images,
        }
        write_json(tmp / MARKER, info)  # last
    log.info("wrote %d synthetic images to %s", len(jobs), out)
    return info


def preview(image: np.ndarray, width: int) -> np.ndarray:
    """Downscaled copy for a README picture (INTER_AREA)."""
    h, w = image.shape[:2]
    return cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
