"""Talking to Caffe safely.

A failed glog ``CHECK`` inside Caffe aborts the whole Python process, so
everything handed to Caffe is checked here first and reported as a Python exception that names
the file and what to do.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]


class CaffeInputError(ValueError):
    """Something we were about to hand to Caffe would make it abort."""


def import_caffe(verbose: bool = False):
    """Import pycaffe with glog's INFO chatter off (unless ``verbose``) and our layers importable."""
    from redseg.toolchain import blas

    blas.configure()  # OpenBLAS reads OPENBLAS_CORETYPE once, when Caffe loads it: first (redseg/toolchain/blas.py)
    if not verbose:
        os.environ.setdefault("GLOG_minloglevel", "2")
    for p in (str(REPO), str(REPO / "python_layers")):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        import caffe
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            f"cannot import pycaffe ({e}). Run `make setup` and use .venv/bin/python, "
            "or put an existing Caffe's python/ folder on PYTHONPATH."
        ) from e
    return caffe


def set_mode(gpu: int | None):
    """CPU mode, or GPU ``gpu`` after checking that this Caffe build and machine can do it."""
    caffe = import_caffe()
    if gpu is None or gpu < 0:
        caffe.set_mode_cpu()
        return caffe
    if not caffe_has_cuda():
        raise RuntimeError(
            f"--gpu {gpu} asked for, but this Caffe was built CPU-only. "
            "Rebuild with `make setup CUDA=1 CUDA_ROOT=...` (docs/gpu.md) or drop --gpu."
        )
    n = _visible_gpus()
    if n is not None and gpu >= n:
        raise RuntimeError(f"--gpu {gpu} asked for, but nvidia-smi lists {n} GPU(s)")
    caffe.set_device(gpu)
    caffe.set_mode_gpu()
    return caffe


def _library_mentions(token: bytes) -> bool:
    """Whether the imported Caffe's Python module or shared library holds ``token`` (a symbol or a
    string compiled in): how a build's CUDA and its memory patches are told apart without a GPU."""
    caffe = import_caffe()
    lib_dir = Path(caffe.__file__).resolve().parents[2] / "build" / "lib"
    for f in [Path(caffe.__file__).parent / "_caffe.so", *sorted(lib_dir.glob("libcaffe.so*"))]:
        try:
            if token in f.read_bytes():
                return True
        except OSError:
            continue
    return False


def caffe_has_cuda() -> bool:
    """Whether the imported Caffe library was compiled with CUDA (it links libcudart)."""
    return _library_mentions(b"cudaGetDeviceCount")


# The runtime switch of the shared im2col buffer (make setup's default patch, docs/install.md): "0"
# in the environment when a convolution layer is set up gives that layer its own buffer, as
# upstream Caffe does.
SHARED_COL_ENV = "REDSEG_SHARED_COL"


def caffe_shared_col() -> bool:
    """Whether the imported Caffe has the project's shared im2col buffer (its library reads
    ``REDSEG_SHARED_COL``); False for a build made with ``make setup SHARED_COL=0`` or another Caffe."""
    return _library_mentions(SHARED_COL_ENV.encode())


# The runtime switches of the shared diff and data memory (make setup's patches, docs/install.md):
# "1" in the environment when a Net is constructed lets the diffs of its intermediate blobs share
# memory by liveness in backward (REDSEG_SHARED_DIFF), and with it their data and diffs share one
# arena by liveness over the whole iteration (REDSEG_SHARED_DATA); neither is then kept after
# backward. Off unless set (pycaffe users, the gradient tests and redseg/training/grad_study.py
# read blobs after backward); the training driver turns both on for the nets it builds
# (shared_blob_memory) unless the environment already sets them (=0: the user opted out).
SHARED_DIFF_ENV = "REDSEG_SHARED_DIFF"
SHARED_DATA_ENV = "REDSEG_SHARED_DATA"


def caffe_shared_diff() -> bool:
    """Whether the imported Caffe has the project's shared diff memory (its library reads
    ``REDSEG_SHARED_DIFF``); False for a build made with ``make setup SHARED_DIFF=0`` or another Caffe."""
    return _library_mentions(SHARED_DIFF_ENV.encode())


def caffe_shared_data() -> bool:
    """Whether the imported Caffe has the project's shared data memory (its library reads
    ``REDSEG_SHARED_DATA``; with the shared diff patches, make setup SHARED_DIFF=1)."""
    return _library_mentions(SHARED_DATA_ENV.encode())


@contextlib.contextmanager
def shared_blob_memory():
    """Nets constructed inside share their intermediate blobs' diff memory (REDSEG_SHARED_DIFF=1) and
    data memory (REDSEG_SHARED_DATA=1), each unless the environment already sets it (=0: opted out)."""
    added = [env for env in (SHARED_DIFF_ENV, SHARED_DATA_ENV) if env not in os.environ]
    for env in added:
        os.environ[env] = "1"
    try:
        yield
    finally:
        for env in added:
            os.environ.pop(env, None)


def _visible_gpus() -> int | None:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        raise RuntimeError("no NVIDIA driver on this machine (nvidia-smi not found); drop --gpu")
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def read_net_param(path: str | os.PathLike):
    """Parse a net prototxt into a ``NetParameter`` (a Python error, not an abort, if malformed)."""
    caffe = import_caffe()
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format

    path = Path(path)
    if not path.is_file():
        raise CaffeInputError(f"net definition not found: {path}")
    param = caffe_pb2.NetParameter()
    try:
        text_format.Merge(path.read_text(), param)
    except text_format.ParseError as e:
        raise CaffeInputError(f"{path}: not a valid Caffe net prototxt: {e}") from e
    del caffe
    return param


def check_net_param(param, source: str = "net") -> None:
    """Layer types registered, Python layer modules importable, every bottom produced earlier."""
    caffe = import_caffe()
    known = set(caffe.layer_type_list())
    produced: set[str] = set(param.input)
    for layer in param.layer:
        if layer.type not in known:
            raise CaffeInputError(
                f"{source}: layer '{layer.name}' has type '{layer.type}', which this Caffe build "
                f"does not know (known types include {', '.join(sorted(known)[:8])}, ...)"
            )
        if layer.type == "Python":
            mod = layer.python_param.module
            try:
                module = importlib.import_module(mod)
            except ImportError as e:
                raise CaffeInputError(
                    f"{source}: Python layer '{layer.name}' needs module '{mod}', which cannot be "
                    f"imported ({e}); is python_layers/ on sys.path?"
                ) from e
            if not hasattr(module, layer.python_param.layer):
                raise CaffeInputError(f"{source}: module '{mod}' has no layer class '{layer.python_param.layer}'")
        for b in layer.bottom:
            if b not in produced:
                raise CaffeInputError(f"{source}: layer '{layer.name}' reads blob '{b}', which no earlier layer makes")
        produced.update(layer.top)


def load_net(prototxt: str | os.PathLike, phase: str = "TEST", weights: str | os.PathLike | None = None):
    """``caffe.Net`` after checking the definition (and the weights, see :func:`check_weights`)."""
    caffe = import_caffe()
    param = read_net_param(prototxt)
    check_net_param(param, str(prototxt))
    ph = caffe.TEST if phase == "TEST" else caffe.TRAIN
    net = caffe.Net(str(prototxt), ph)
    if weights is not None:
        check_weights(weights, net, strict=True)
        net.copy_from(str(weights))
    return net


def read_binary_proto(path: str | os.PathLike, message: str, what: str):
    """Parse a binary Caffe protobuf file (``message``: e.g. "NetParameter") or say what is wrong."""
    import_caffe()
    from caffe.proto import caffe_pb2
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise CaffeInputError(f"{what} not found: {path}")
    param = getattr(caffe_pb2, message)()
    try:
        param.ParseFromString(path.read_bytes())
    except DecodeError as e:
        raise CaffeInputError(f"{path}: not a Caffe {what} (binary {message}): {e}") from e
    return param


def read_caffemodel(path: str | os.PathLike) -> dict[str, list[tuple[int, ...]]]:
    """Layer name -> parameter blob shapes of a ``.caffemodel`` (without loading it into Caffe)."""
    param = read_binary_proto(path, "NetParameter", "weights file")
    layers = list(param.layer) or list(param.layers)  # new and V1 formats
    shapes = {}
    for layer in layers:
        blobs = []
        for b in layer.blobs:
            if b.HasField("shape"):
                blobs.append(tuple(b.shape.dim))
            else:  # legacy 4-D blobs
                blobs.append(tuple(d for d in (b.num, b.channels, b.height, b.width)))
        if blobs:
            shapes[layer.name] = blobs
    if not shapes:
        raise CaffeInputError(f"{path}: holds no layer with weights; is it really a trained model?")
    return shapes


def _canon(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shapes as Caffe's ShapeEquals sees them: legacy 4-D blobs (e.g. a bias 1x1x1x64) == (64,)."""
    i = 0
    while i < len(shape) - 1 and shape[i] == 1:
        i += 1
    return tuple(shape[i:])


def _net_param_shapes(net) -> dict[str, list[tuple[int, ...]]]:
    return {name: [tuple(b.data.shape) for b in blobs] for name, blobs in net.params.items()}


def check_weights(weights, net, strict: bool, required: tuple[str, ...] = ()) -> list[str]:
    """Check a ``.caffemodel`` against a net before ``copy_from`` (which aborts on a mismatch).

    Caffe copies by layer name and CHECK-fails when a same-named layer's blob shapes differ.
    Returns the names that will be copied. ``strict``: every parametrised layer of the net must be
    in the file (a trained Red-Seg model for testing). ``required``: names that must be present
    (e.g. the 13 VGG16 convs when initialising stage 1).
    """
    have = read_caffemodel(weights)
    want = _net_param_shapes(net)
    common = [n for n in want if n in have]
    for name in common:
        if [_canon(s) for s in have[name]] != [_canon(s) for s in want[name]]:
            raise CaffeInputError(
                f"{weights}: layer '{name}' has blob shapes {have[name]}, the net expects {want[name]}; "
                "this weights file does not belong to this net"
            )
    missing_req = [n for n in required if n not in have]
    if missing_req:
        raise CaffeInputError(
            f"{weights}: lacks layers {', '.join(missing_req)}; expected an ImageNet VGG16 model with "
            "layers conv1_1 .. conv5_3 (see `make vgg16`)"
        )
    if strict:
        missing = [n for n in want if n not in have]
        if missing:
            raise CaffeInputError(
                f"{weights}: lacks layers {', '.join(missing[:6])}{'...' if len(missing) > 6 else ''} "
                "of this net; is it a Red-Seg model trained with this project?"
            )
    return common
