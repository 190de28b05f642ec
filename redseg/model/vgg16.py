"""ImageNet VGG16 weights for stage 1 (paper section 3.2), in whichever form the user can get them.

Stage 1 copies the 13 VGG16 convolutions into the net by name (``conv1_1`` ... ``conv5_3``). The
Caffe model zoo file is the natural source, but since 2024 its Oxford address serves a page of a few
hundred bytes instead of the 528 MB model. The same weights are still distributed by Keras as an
HDF5 file (the VGG group's weights, ported). This module

- recognises a weights file by its content (Caffe ``.caffemodel``, V1 or V2, or Keras' HDF5 file
  with or without the top layers), never by its name;
- converts the Keras file into a Caffe weights file holding the 13 convolutions in Caffe's layout,
  cached beside the source (or in the cache folder when that is read-only);
- validates every candidate the same way (the 13 convolutions by name and shape), so that a wrong
  file is reported as a Python error before Caffe would abort on it;
- fetches the weights for ``make vgg16``: the Caffe addresses first, then Keras' file from its two
  addresses, checked against its published size and md5.

See docs/weights.md for where the files come from and why no channel swap or kernel flip is needed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from redseg import config as C
from redseg.fileio import atomic_path, cache_root, file_digest, write_json
from redseg.toolchain.caffe_utils import CaffeInputError, import_caffe, read_caffemodel

log = logging.getLogger(__name__)

# --- Where the weights come from (docs/weights.md) ------------------------------------------------
# The Caffe model zoo entry of Simonyan & Zisserman's 16-layer model, and HED's copy of it.
CAFFE_NAME = "VGG_ILSVRC_16_layers.caffemodel"
CAFFE_URLS = (
    "http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/VGG_ILSVRC_16_layers.caffemodel",
    "https://vcl.ucsd.edu/hed/5stage-vgg.caffemodel",
)


@dataclass(frozen=True)
class KerasRelease:
    """One of Keras' VGG16 ImageNet weight files: name, size and md5 as Keras' own loader checks them."""

    name: str
    size: int
    md5: str
    urls: tuple[str, ...]


_KERAS_BASES = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/",
    "https://github.com/fchollet/deep-learning-models/releases/download/v0.1/",
)
# md5s from Keras' applications source (keras/src/applications/vgg16.py, `file_hash`); sizes as
# Keras' downloader reports them.
KERAS_NOTOP = KerasRelease(
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    58_889_256,
    "6d6bbae143d832006294945121d1f1fc",
    tuple(b + "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" for b in _KERAS_BASES),
)
KERAS_FULL = KerasRelease(
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
    553_467_096,
    "64373286793e3c8b2b4e3219cbf3544b",
    tuple(b + "vgg16_weights_tf_dim_ordering_tf_kernels.h5" for b in _KERAS_BASES),
)
KERAS_RELEASES = (KERAS_NOTOP, KERAS_FULL)

# Bump when the conversion changes, so that files converted by an older version are redone.
CONVERTER_VERSION = 1

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class VGG16Error(CaffeInputError):
    """A VGG16 weights file (or download) that cannot be used to initialise stage 1."""


class FetchError(VGG16Error):
    """Every address failed; ``attempts`` holds (address, why) for each, in order."""

    def __init__(self, attempts: list[tuple[str, str]]):
        self.attempts = attempts
        super().__init__("no source gave valid VGG16 weights:\n" + "\n".join(f"  {u}: {w}" for u, w in attempts))


# --- Names and shapes ----------------------------------------------------------------------------
def conv_shapes() -> dict[str, tuple[int, int, int, int]]:
    """Caffe layer name -> weight blob shape (out, in, 3, 3) of VGG16's 13 convolutions, in order."""
    out, cin = {}, 3
    for stage, nout, nconv in C.VGG16_CONVS:
        for i in range(1, nconv + 1):
            out[f"{stage}_{i}"] = (nout, cin, 3, 3)
            cin = nout
    return out


def keras_layer(caffe_name: str) -> str:
    """Keras' name of a VGG16 convolution: ``conv3_2`` -> ``block3_conv2``."""
    stage, i = caffe_name.removeprefix("conv").split("_")
    return f"block{stage}_conv{i}"


# --- Recognising and validating a file -----------------------------------------------------------
def _is_html(head: bytes) -> bool:
    # A serialized NetParameter never starts with '<' (0x3c would be an end-group tag of field 7).
    return head.lstrip()[:1] == b"<"


def detect_format(path: str | os.PathLike) -> str:
    """``"caffemodel"`` or ``"keras-hdf5"``, from the file's bytes (HDF5 has a signature; a protobuf has none)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise VGG16Error(f"VGG16 weights not found: {path}")
    with path.open("rb") as f:
        head = f.read(1024)
    if not head:
        raise VGG16Error(f"{path}: an empty file, not VGG16 weights")
    if head.startswith(HDF5_SIGNATURE) or h5py.is_hdf5(str(path)):
        return "keras-hdf5"
    if _is_html(head):
        raise VGG16Error(
            f"{path}: a web page ({path.stat().st_size:,} bytes), not VGG16 weights; the address it came "
            "from no longer serves the model"
        )
    return "caffemodel"


def validate_caffemodel(path: str | os.PathLike) -> None:
    """The 13 VGG16 convolutions are in this ``.caffemodel``, by Caffe name and shape (V1 or V2 file)."""
    path = Path(path)
    if path.is_file():
        with path.open("rb") as f:
            if _is_html(f.read(1024)):
                raise VGG16Error(
                    f"{path}: a web page ({path.stat().st_size:,} bytes), not a Caffe model; the address it "
                    "came from no longer serves the model"
                )
    shapes = read_caffemodel(path)
    for name, shape in conv_shapes().items():
        if name not in shapes:
            raise VGG16Error(f"{path}: no layer {name}; not an ImageNet VGG16 model")
        if tuple(shapes[name][0]) != shape:
            raise VGG16Error(f"{path}: {name} weights are {shapes[name][0]}, VGG16 has {shape}")


# --- Reading Keras' HDF5 file --------------------------------------------------------------------
def _attr_list(obj, name: str) -> list[str] | None:
    """A Keras list attribute (``layer_names``, ``weight_names``) as strings, or None if absent.

    Keras splits an attribute too large for an HDF5 object header into ``name0``, ``name1``, ...
    """
    if name in obj.attrs:
        values = list(np.atleast_1d(obj.attrs[name]))
    elif f"{name}0" in obj.attrs:
        values, i = [], 0
        while f"{name}{i}" in obj.attrs:
            values.extend(np.atleast_1d(obj.attrs[f"{name}{i}"]))
            i += 1
    else:
        return None
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _attr_str(obj, name: str) -> str | None:
    v = obj.attrs.get(name)
    if v is None:
        return None
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _expected_keras_file() -> str:
    return (
        f"expected Keras' VGG16 ImageNet weights, {KERAS_NOTOP.name} ({KERAS_NOTOP.size:,} bytes) or "
        f"{KERAS_FULL.name} ({KERAS_FULL.size:,} bytes), whose 13 convolutions are the groups "
        "block1_conv1 ... block5_conv3, each with a kernel and a bias"
    )


def read_keras_convs(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Caffe name -> (kernel, bias) in Keras' layout: kernel (3, 3, in, out), bias (out,), float32.

    Reads Keras 2's weight-file format: each layer is a group holding the datasets its
    ``weight_names`` attribute lists (old files: ``block1_conv1_W_1:0``; newer ones
    ``block1_conv1/kernel:0``). A whole saved model (weights under ``model_weights``) works too.
    Only TensorFlow-ordered kernels are accepted: Theano's are flipped for a true convolution.
    """
    import h5py

    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise VGG16Error(
            f"{path}: an HDF5 file that cannot be opened ({size:,} bytes; truncated or damaged?): {e}. "
            + _expected_keras_file()
        ) from e
    with f:
        root = f
        if _attr_list(f, "layer_names") is None and isinstance(f.get("model_weights"), h5py.Group):
            root = f["model_weights"]
        backend = _attr_str(root, "backend") or _attr_str(f, "backend")
        if backend == "theano":
            raise VGG16Error(
                f"{path}: Keras weights saved with the Theano backend (kernels flipped for a true convolution, "
                f"'th' ordering); not supported. Use {KERAS_NOTOP.name}"
            )
        wanted = {name: keras_layer(name) for name in conv_shapes()}
        missing = [k for k in wanted.values() if not isinstance(root.get(k), h5py.Group)]
        if missing:
            have = sorted(root.keys())
            raise VGG16Error(
                f"{path}: an HDF5 file, but not Keras' VGG16 weights: no group {', '.join(missing)} "
                f"(it holds {', '.join(have[:8]) or 'nothing'}{', ...' if len(have) > 8 else ''}); "
                + _expected_keras_file()
            )
        convs = {}
        for name, kname in wanted.items():
            convs[name] = _read_keras_conv(path, root[kname], kname, conv_shapes()[name])
        top = "fc1" in (_attr_list(root, "layer_names") or []) or "fc1" in root
        log.info(
            "%s: Keras VGG16 weights (%s top layers; keras_version %s, backend %s)",
            path,
            "with" if top else "without",
            _attr_str(f, "keras_version") or "not recorded",
            backend or "not recorded",
        )
    return convs


def _read_keras_conv(path: Path, group, kname: str, caffe_shape) -> tuple[np.ndarray, np.ndarray]:
    names = _attr_list(group, "weight_names")
    if names is None:
        raise VGG16Error(f"{path}: group {kname} has no 'weight_names' attribute; not a Keras 2 weights file")
    arrays = []
    for n in names:
        if n not in group:
            raise VGG16Error(f"{path}: {kname} lists weight '{n}', which the file does not hold")
        try:
            arrays.append(np.asarray(group[n][()], dtype=np.float32))
        except (OSError, TypeError) as e:
            raise VGG16Error(f"{path}: cannot read {kname}/{n} (truncated or damaged file?): {e}") from e
    kernels = [a for a in arrays if a.ndim == 4]
    biases = [a for a in arrays if a.ndim == 1]
    if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
        raise VGG16Error(
            f"{path}: {kname} holds weights of shapes {[a.shape for a in arrays]}; a convolution has a 4-D "
            "kernel and a 1-D bias"
        )
    kernel, bias = kernels[0], biases[0]
    cout, cin, kh, kw = caffe_shape
    if kernel.shape == (cout, cin, kh, kw) and kernel.shape != (kh, kw, cin, cout):
        raise VGG16Error(
            f"{path}: {kname} kernel is {kernel.shape}, Theano ('th') ordering; not supported. "
            f"Use {KERAS_NOTOP.name} (TensorFlow ordering)"
        )
    if kernel.shape != (kh, kw, cin, cout) or bias.shape != (cout,):
        raise VGG16Error(
            f"{path}: {kname} has kernel {kernel.shape} and bias {bias.shape}; VGG16's are "
            f"{(kh, kw, cin, cout)} and {(cout,)}"
        )
    return kernel, bias


# --- Converting ----------------------------------------------------------------------------------
def keras_to_caffe(kernel: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras (h, w, in, out) -> Caffe (out, in, h, w); no spatial flip.

    Both frameworks compute a cross-correlation (TensorFlow's conv2d and Caffe's im2col + GEMM), so
    the same tap multiplies the same neighbour in both: only the axes move. The input channels are
    BGR in both (Keras' "caffe" preprocessing swaps RGB to BGR), so no channel reordering either.
    """
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32), np.asarray(bias, np.float32)


def write_caffemodel(convs: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, name: str) -> None:
    """A V2 ``NetParameter`` with one Convolution layer (weights, bias) per entry, in Caffe's layout."""
    import_caffe()
    from caffe.proto import caffe_pb2

    param = caffe_pb2.NetParameter(name=name)
    for lname, (w, b) in convs.items():
        layer = param.layer.add(name=lname, type="Convolution")
        layer.convolution_param.num_output = w.shape[0]
        layer.convolution_param.kernel_size.append(w.shape[2])
        layer.convolution_param.pad.append(w.shape[2] // 2)
        for arr in (w, b):
            blob = layer.blobs.add()
            blob.shape.dim.extend(arr.shape)
            blob.data.extend(arr.ravel().tolist())  # tolist: much faster than extending from numpy
    Path(path).write_bytes(param.SerializeToString())


def file_md5(path: str | os.PathLike) -> str:
    """The md5 Keras publishes for its files (a checksum, not a security measure)."""
    return file_digest(path, "md5")


def cache_dir() -> Path:
    """Where a conversion goes when the source's folder is read-only: ``<cache>/vgg16``."""
    return cache_root() / "vgg16"


def converted_path(source: Path) -> Path:
    """Where the conversion of ``source`` is cached beside it: ``<source>.caffemodel``."""
    return source.with_name(source.name + ".caffemodel")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed from permission bits)."""
    try:
        probe = folder / f".redseg-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def known_release(md5: str) -> KerasRelease | None:
    return next((r for r in KERAS_RELEASES if r.md5 == md5), None)


def convert_keras(source: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert Keras' VGG16 HDF5 file into a Caffe weights file and return its path.

    ``out`` defaults to ``<source>.caffemodel`` beside the source, or, if that folder is not
    writable, ``<cache>/vgg16/<md5 of source>.caffemodel``. A sidecar ``<out>.json`` records the
    source's md5 and the converter version; a conversion is re-used only if both match and it still
    validates. A new one is written under a temporary name, validated, then renamed, so a half-written
    file is never taken for a finished one. The source's md5 need not be a known release (a user's
    own copy, with or without the top layers), but whether it is gets logged.
    """
    source = Path(source)
    md5 = file_md5(source)
    rel = known_release(md5)
    if rel:
        log.info("%s: md5 %s, Keras' released %s", source, md5, rel.name)
    else:
        log.warning(
            "%s: md5 %s matches no Keras release (%s); converting it anyway if its 13 convolutions have VGG16's shapes",
            source,
            md5,
            ", ".join(f"{r.name} {r.md5}" for r in KERAS_RELEASES),
        )
    if out is None:
        out = converted_path(source)
        if not _writable(out.parent):
            out = cache_dir() / f"{md5}.caffemodel"
            log.warning("%s is not writable: caching the conversion at %s instead", source.parent, out)
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    stamp = {"source": str(source), "source_md5": md5, "converter": CONVERTER_VERSION}
    if out.is_file() and sidecar.is_file():
        try:
            old = json.loads(sidecar.read_text())
            if old.get("source_md5") == md5 and old.get("converter") == CONVERTER_VERSION:
                validate_caffemodel(out)
                log.info("%s: re-using the conversion of %s", out, source)
                return out
        except (ValueError, OSError, CaffeInputError) as e:
            log.warning("%s: not re-usable (%s); converting again", out, e)
    convs = {name: keras_to_caffe(k, b) for name, (k, b) in read_keras_convs(source).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)  # until the new file is in place, no stamp vouches for `out`
    with atomic_path(out) as tmp:
        write_caffemodel(convs, tmp, name=f"VGG16 convolutions converted from {source.name} (md5 {md5})")
        validate_caffemodel(tmp)
    write_json(sidecar, stamp)
    log.info("%s: converted from %s (13 convolutions, Caffe layout) and validated", out, source)
    return out


def prepare_weights(path: str | os.PathLike, validate: bool = True) -> Path:
    """The Caffe weights file to initialise stage 1 from ``path``, whatever its form.

    A ``.caffemodel`` is returned as is, validated unless ``validate`` is false (training checks it
    against the net itself, and a 528 MB file need not be parsed twice); Keras' HDF5 file is
    converted, always validated (cached, see :func:`convert_keras`). The form is recognised by
    content, so the file may have any name.
    """
    path = Path(path)
    if detect_format(path) == "keras-hdf5":
        return convert_keras(path)
    if validate:
        validate_caffemodel(path)
    return path


# --- Fetching ------------------------------------------------------------------------------------
def download(url: str, out: Path, timeout: float, size: int | None = None, md5: str | None = None, check=None) -> None:
    """Download ``url`` to ``out``, refusing it (nothing left at ``out``) on a wrong size or md5.

    ``check``: a further validation of the finished temporary file (e.g. :func:`validate_caffemodel`).
    """
    from tqdm import tqdm

    with atomic_path(out) as tmp:
        h = hashlib.md5()  # noqa: S324 - a published checksum, not a security measure
        got = 0
        with urllib.request.urlopen(url, timeout=timeout) as r, tmp.open("wb") as f:  # noqa: S310
            total = int(r.headers.get("Content-Length") or 0)
            if size is not None and total and total != size:
                raise VGG16Error(f"the server offers {total:,} bytes, {out.name} has {size:,}; refused")
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=out.name, disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if size is not None and got != size:
            raise VGG16Error(f"got {got:,} bytes, {out.name} has {size:,} (truncated download?); refused")
        if md5 is not None and h.hexdigest() != md5:
            raise VGG16Error(f"md5 {h.hexdigest()}, expected {md5} for {out.name}; refused and deleted")
        if check is not None:
            check(tmp)


_NETWORK_ERRORS = (OSError, ValueError, http.client.HTTPException)  # URLError, timeouts; bad URLs


def fetch(
    out: str | os.PathLike,
    caffe_urls: tuple[str, ...] | list[str] = CAFFE_URLS,
    keras: tuple[KerasRelease, ...] | list[KerasRelease] = (KERAS_NOTOP,),
    timeout: float = 30.0,
) -> tuple[Path, str]:
    """Put valid VGG16 Caffe weights at ``out``; returns (path, which source worked).

    In order: a file already at ``out`` (any form; a Keras file is converted beside it); a Keras
    file placed by hand in ``out``'s folder; each Caffe model address; each address of each Keras
    release (size and md5 checked, kept in ``out``'s folder, converted into ``out``). Raises
    :class:`FetchError` naming every address tried and why it failed.
    """
    out = Path(out)
    if out.is_file():
        path = prepare_weights(out)
        return path, f"{out}, already present" + ("" if path == out else " (Keras' file, converted)")
    for rel in KERAS_RELEASES:
        local = out.parent / rel.name
        if local.is_file():
            return convert_keras(local, out), f"{local}, placed there by hand, converted"
    out.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[tuple[str, str]] = []
    for url in caffe_urls:
        log.info("trying %s", url)
        try:
            download(url, out, timeout, check=validate_caffemodel)
            return out, f"the Caffe model at {url}"
        except _NETWORK_ERRORS as e:
            attempts.append((url, str(e)))
    for rel in keras:
        local = out.parent / rel.name
        for url in rel.urls:
            log.info("trying %s", url)
            try:
                download(url, local, timeout, size=rel.size, md5=rel.md5)
            except _NETWORK_ERRORS as e:
                attempts.append((url, str(e)))
                continue
            try:
                convert_keras(local, out)
            except CaffeInputError as e:
                attempts.append((url, f"downloaded, but the conversion failed: {e}"))
                continue
            return out, f"Keras' {rel.name} from {url} (size and md5 checked), converted to Caffe"
    raise FetchError(attempts)
