"""The Red-Seg training data layer (Caffe ``Python`` layer).

Reads a list file of (image, MA mask, HE mask) triples from a prepared set (docs/data_format.md)
and outputs ``data`` (1x3xHxW, BGR minus the per-channel mean stored in the set's meta.json),
``label_ma`` and ``label_he`` (1x1xHxW, 0/1). Batch size 1 (paper section 3.2); every image is
taken at its own size (rot90/rot270 samples are portrait). Shuffled with a seed, reshuffled every
epoch. Decoded samples are cached in memory (uint8, the image already in Caffe's channel-first
order) after their first use, and the next sample is loaded in a background thread while Caffe
runs the net, so in steady state an iteration costs one fused uint8 -> float32 mean subtraction
into the top blob and two label copies (about 1 ms at 1072x712; docs/performance.md).

param_str (JSON): ``list`` (path of the list file; required), ``shuffle`` (true), ``seed`` (1),
``cache`` (true), ``mean`` (optional [B, G, R] overriding meta.json), ``fov`` (false; true adds a
fourth top ``fov``, 1x1xHxW, 1 inside the image's circular field of view (redseg.data.fov) and 0 in the
black surround, for the Top-k loss's ``negatives: "fov"`` option; docs/method.md#counting-negatives).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import caffe
import numpy as np

from redseg.data.prepared_set import load_sample, mean_bgr, read_list

DEFAULTS = dict(list=None, shuffle=True, seed=1, cache=True, mean=None, fov=False)


class RedSegData(caffe.Layer):
    def setup(self, bottom, top):
        try:
            p = json.loads(self.param_str)
        except json.JSONDecodeError as e:
            raise ValueError(f"RedSegData: param_str must be JSON, got {self.param_str!r} ({e})") from e
        unknown = set(p) - set(DEFAULTS)
        if unknown or not p.get("list"):
            raise ValueError(f"RedSegData: param_str needs 'list'; unknown keys {sorted(unknown)}")
        p = {**DEFAULTS, **p}
        self.fov = bool(p["fov"])
        if len(top) != 3 + self.fov:
            also = ", and fov with 'fov': true" if self.fov else ""
            raise ValueError(f"RedSegData: needs {3 + self.fov} tops (data, label_ma, label_he{also})")
        self.samples = read_list(p["list"])
        self.mean = (
            np.asarray(p["mean"], dtype=np.float32) if p["mean"] is not None else mean_bgr(Path(p["list"]).parent)
        )
        self.shuffle = bool(p["shuffle"])
        self.rng = np.random.default_rng(int(p["seed"]))
        self.cache: dict[int, tuple] | None = {} if p["cache"] else None
        self.order = self._new_order()
        self.pos = 0  # index into self.order of the next sample
        self.epoch = 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending = self.pool.submit(self._load, int(self.order[0]))
        self.in_setup = True  # Caffe's SetUp calls reshape once: that call consumes no sample

    def _new_order(self) -> np.ndarray:
        idx = np.arange(len(self.samples))
        return self.rng.permutation(idx) if self.shuffle else idx

    def _load(self, i: int):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img, ma, he = load_sample(self.samples[i])
        # HxWx3 -> 3xHxW once here (in the loader thread), not in every forward: a contiguous
        # source makes the per-iteration subtraction about 3x faster than from a strided view.
        sample = (np.ascontiguousarray(img.transpose(2, 0, 1)), ma, he)
        if self.fov:
            from redseg.data.fov import fov_mask

            sample += (fov_mask(img, str(self.samples[i].image)).view(np.uint8),)
        if self.cache is not None:
            self.cache[i] = sample
        return sample

    def _advance(self) -> int:
        """Index of the sample after the current one; reshuffles at the end of an epoch."""
        self.pos += 1
        if self.pos == len(self.order):
            self.pos, self.epoch = 0, self.epoch + 1
            self.order = self._new_order()
        return int(self.order[self.pos])

    def skip(self, n: int) -> None:
        """Move past ``n`` samples without loading them: a resumed run sees the same sequence."""
        self.pending.result()  # let the queued load finish before replacing it
        for _ in range(n):
            i = self._advance()
        if n:
            self.pending = self.pool.submit(self._load, i)

    def reshape(self, bottom, top):
        self.current = self.pending.result()  # raises the DataError of a bad file, naming it
        if self.in_setup:  # only shows the first sample's size; the first forward takes it again
            self.in_setup = False
        else:
            self.pending = self.pool.submit(self._load, self._advance())
        h, w = self.current[0].shape[1:]
        top[0].reshape(1, 3, h, w)
        top[1].reshape(1, 1, h, w)
        for i in range(1, len(top)):  # pycaffe's top vector does not slice
            top[i].reshape(1, 1, h, w)

    def forward(self, bottom, top):
        chw, ma, he = self.current[:3]
        # BGR minus the per-channel mean (as redseg.data.prepared_set.image_blob), straight into the top blob.
        np.subtract(chw, self.mean.reshape(3, 1, 1), out=top[0].data[0], dtype=np.float32)
        top[1].data[0, 0] = ma
        top[2].data[0, 0] = he
        if self.fov:
            top[3].data[0, 0] = self.current[3]

    def backward(self, top, propagate_down, bottom):
        pass
