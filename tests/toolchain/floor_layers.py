"""A minimal Python loss layer used only by tests/toolchain/test_caffe_floor.py (half the squared error)."""

import caffe
import numpy as np


class HalfSquaredError(caffe.Layer):
    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("needs two bottoms")

    def reshape(self, bottom, top):
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[0] = 0.5 * np.sum(self.diff**2)

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.diff * top[0].diff[0]
