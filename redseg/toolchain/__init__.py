"""Toolchain: where Caffe comes from (source chain, patch set), which OpenBLAS kernels it runs, and
how the rest of the package imports it (quiet glog, checked weights, CPU/GPU mode).

Bottom of the stack: imports only the standard library, numpy and redseg.fileio / redseg.config.
Named so that it never shadows the ``caffe`` module itself.
"""
