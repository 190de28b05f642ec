"""Where `make setup` gets BVLC Caffe's source, and the project's own patches to it.

Caffe's last release is 1.0 (2017) and its repository's last commit is from 2020, so no single
archive can be relied on to keep serving it: Debian carries it only in bullseye, Ubuntu not at
all. ``tools/setup.sh`` therefore tries a chain of sources (docs/install.md):

1. ``CAFFE_ROOT``: a Caffe the user already built (no source needed);
2. ``CAFFE_SRC``: a BVLC Caffe source folder or tarball the user has;
3. Debian's source package ``caffe`` through the system's Debian archive (or ``DEBIAN_MIRROR``);
4. the upstream repository's tarball at a pinned commit, checked against a pinned digest.

Whatever the source, one patch set (:data:`PATCHES`) makes it build with today's toolchains, and
by default (``SHARED_COL=1``) :data:`SHARED_COL_PATCHES` make the convolution layers of a thread
share one im2col buffer, and (``SHARED_DIFF=1``) :data:`SHARED_DIFF_PATCHES` let a net's blob diffs
share memory by liveness when ``REDSEG_SHARED_DIFF=1`` (:func:`patch_set`). The patches are edits
this project wrote, each checked after it is applied, and each recognises a tree that already has
it, so they apply to the 1.0 release, to the last upstream commit and to Debian's tree alike.

This module is used by ``tools/setup.sh`` through its command line (``python -m
redseg.toolchain.caffe_source ...``) and needs nothing beyond the standard library and redseg.fileio.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from redseg.fileio import file_digest

log = logging.getLogger(__name__)

# The last commit of BVLC/caffe's master (2020-02-13); Debian's 1.0.0+git20180821.99bd997 differs
# from it in README.md and a lint script only.
UPSTREAM_COMMIT = "9b891540183ddc834a02b2bd81b31afae71b2153"
UPSTREAM_URL = f"https://github.com/BVLC/caffe/archive/{UPSTREAM_COMMIT}.tar.gz"
# sha256 of the tree's *contents* (:func:`tree_digest`), not of the tarball's bytes: the hosting
# service generates its tarballs on request and does not promise byte-identical compression, while
# the files in them are fixed by the commit. Computed from a checkout of UPSTREAM_COMMIT.
UPSTREAM_DIGEST = "cd962d63c34071e50864b1b33e9598b1c0d6b82d4f4360d82c3e1369a960150d"

# Folders that are build products, not source: left out of digests and copies.
_NOT_SOURCE = {".git", "build", ".build_release", ".build_debug", "distribute"}


class SourceError(RuntimeError):
    """A Caffe source that cannot be used; the message says which and what to do."""


# --- identity of a source -----------------------------------------------------------------------
def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and content (symbolic links by their target).

    Independent of how the tree was packed (tar, gzip level, zip, a checkout), so a source can be
    pinned by what it contains. Build folders at the top (``build/`` ...) and ``.git`` are skipped.
    """
    root = Path(root)
    h = hashlib.sha256()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not (d == ".git" or (rel_dir == Path(".") and d in _NOT_SOURCE)))
        for name in filenames:
            entries.append((rel_dir / name).as_posix())
        for name in dirnames:
            if (Path(dirpath) / name).is_symlink():
                entries.append((rel_dir / name).as_posix())
    for rel in sorted(entries):
        p = root / rel
        if p.is_symlink():
            h.update(f"L {rel}\0{os.readlink(p)}\n".encode())
        else:
            h.update(f"F {rel}\0{file_digest(p)}\n".encode())
    return h.hexdigest()


def check_caffe_tree(root: Path) -> str:
    """Raise unless ``root`` is a BVLC Caffe source tree; return its version (CAFFE_TARGET_VERSION)."""
    root = Path(root)
    needed = ("CMakeLists.txt", "src/caffe/proto/caffe.proto", "python/caffe/_caffe.cpp", "cmake/Dependencies.cmake")
    missing = [n for n in needed if not (root / n).is_file()]
    if missing:
        raise SourceError(
            f"{root} is not a BVLC Caffe source tree (missing {', '.join(missing)}). "
            "CAFFE_SRC must be the folder holding Caffe's CMakeLists.txt, or a tarball of it."
        )
    m = re.search(r'set\(CAFFE_TARGET_VERSION "([^"]+)"', (root / "CMakeLists.txt").read_text(errors="replace"))
    return m.group(1) if m else "unknown"


# --- getting a tree ---------------------------------------------------------------------------------
def _source_root(top: Path) -> Path:
    """The Caffe tree inside an unpacked archive: the folder itself or its single sub-folder."""
    if (top / "CMakeLists.txt").is_file():
        return top
    subs = [p for p in top.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "CMakeLists.txt").is_file():
        return subs[0]
    return top  # check_caffe_tree names what is missing


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpack ``tarball`` (any compression tar reads) into the new folder ``dest``; return the tree."""
    tarball = Path(tarball)
    if not tarball.is_file():
        raise SourceError(f"CAFFE_SRC={tarball}: no such file or folder")
    dest.mkdir(parents=True)
    try:
        with tarfile.open(tarball) as tf:
            if hasattr(tarfile, "data_filter"):  # refuses absolute paths, '..' and device files
                tf.extractall(dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                for m in tf.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise SourceError(f"{tarball}: unsafe path in archive: {m.name}")
                tf.extractall(dest)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise SourceError(
            f"{tarball}: not a readable tar archive ({type(e).__name__}: {e}). "
            "The file may be truncated or corrupt: download it again."
        ) from e
    root = _source_root(dest)
    check_caffe_tree(root)
    return root


def copy_tree(src: Path, dest: Path) -> Path:
    """Copy a user's source folder (without build folders and .git): the user's files stay untouched."""
    src = Path(src)
    check_caffe_tree(src)
    shutil.copytree(src, dest, symlinks=True, ignore=lambda d, names: [n for n in names if n in _NOT_SOURCE])
    return dest


def download(url: str, dest: Path, digest: str, timeout: float = 60) -> Path:
    """Download a source tarball, unpack it into ``dest`` and check its :func:`tree_digest`.

    A mismatch is refused (the unpacked tree is deleted): a moved tag, a changed archive or a
    tampered mirror must not be built silently.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / "source.tar.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
        except (OSError, ValueError) as e:
            raise SourceError(f"could not download {url}: {e}") from e
        root = unpack(archive, Path(tmp) / "tree")
        got = tree_digest(root)
        if got != digest:
            raise SourceError(
                f"{url}: content digest {got} does not match the pinned {digest}; refusing to build it. "
                "Build from a source you trust with CAFFE_SRC=... instead."
            )
        root.rename(dest)
    return dest


# --- the patch set --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Patch:
    name: str
    file: str
    why: str
    apply: Callable[[str], str | None]  # new text, or None when the tree already has the change


def _protobuf_321(text: str) -> str | None:
    if "SetTotalBytesLimit(kProtoReadBytesLimit)" in text:
        return None
    old_call = r"SetTotalBytesLimit\(\s*kProtoReadBytesLimit\s*,\s*\d+\s*\)"
    new, n = re.subn(old_call, "SetTotalBytesLimit(kProtoReadBytesLimit)", text)
    return new if n else ""


_CUDA13_FIELDS = ("clockRate", "deviceOverlap", "kernelExecTimeoutEnabled")


def _cuda13_device_query(text: str) -> str | None:
    if not any(f"prop.{f}" in text for f in _CUDA13_FIELDS):
        return None if "DeviceQuery" in text else ""
    for field in _CUDA13_FIELDS:  # the printed value becomes "n/a"; nothing else reads these fields
        text = re.sub(rf'\(prop\.{field} \? "Yes" : "No"\)|prop\.{field}', '"n/a"', text)
    return text


_BOOST_PYTHON = """    # Boost.Python (patched by Red-Seg's make setup): Boost >= 1.67 names the library after the
    # interpreter (python311); older Boost used python-py35 or python3. Exact names first.
    set(Boost_PYTHON_FOUND FALSE)
    set(_py ${PYTHON_VERSION_MAJOR}${PYTHON_VERSION_MINOR})
    foreach(_bp python${_py} python-py${_py} python${PYTHON_VERSION_MAJOR} python)
      if(NOT Boost_PYTHON_FOUND)
        find_package(Boost 1.46 QUIET COMPONENTS ${_bp})
        string(TOUPPER ${_bp} _BP)
        set(Boost_PYTHON_FOUND ${Boost_${_BP}_FOUND})
        set(_bp_found ${_bp})
      endif()
    endforeach()
    message(STATUS "Boost.Python: component ${_bp_found} found: ${Boost_PYTHON_FOUND}")
"""


def _boost_python_name(text: str) -> str | None:
    if "patched by Red-Seg" in text:
        return None
    pattern = re.compile(
        r"    # Find the matching boost python implementation\n.*?"
        r"if\(NOT Boost_PYTHON_FOUND\)\s*find_package\(Boost 1\.46 COMPONENTS python\)\s*endif\(\)\n",
        re.S,
    )
    new, n = pattern.subn(lambda _: _BOOST_PYTHON, text, count=1)
    return new if n else ""


# --- the shared im2col buffer (SHARED_COL) ---------------------------------------------------------
# Upstream, every Convolution/Deconvolution layer owns an im2col buffer; a net holds their sum
# (about 5 GB for Red-Seg at 1072x712). These two edits make the layers of one thread share one
# buffer, as large as the largest layer's: the idea of BVLC/caffe pull request #2016, "Share
# convolution buffers to reduce memory usage", written anew for this project (docs/install.md).
# The comment inserted into base_conv_layer.cpp says why the arithmetic is unchanged and why it
# is thread safe.
_SHARED_COL_MARK = "Red-Seg shared im2col buffer"

_SHARED_COL_DECLARE = """\
// Red-Seg shared im2col buffer (added by Red-Seg's make setup; docs/install.md): the column
// buffer that the convolution layers run by one thread share (base_conv_layer.cpp).
class SharedColBuffer;

"""

_SHARED_COL_MEMBERS = """\
  // Red-Seg shared im2col buffer: unless REDSEG_SHARED_COL=0 when the layer is set up, the columns
  // live in the calling thread's SharedColBuffer and col_buffer_ only carries their shape (its
  // memory is never touched, so never allocated). col_buffer_cpu()/col_buffer_gpu() give the
  // columns either way; shared_col_buffer_ keeps the buffer of the thread that last ran the layer.
  bool share_col_buffer_;
  shared_ptr<SharedColBuffer> shared_col_buffer_;
  Dtype* col_buffer_cpu();
#ifndef CPU_ONLY
  Dtype* col_buffer_gpu();
#endif
"""

_SHARED_COL_INCLUDES = """\
#include <cstdlib>
#include <string>

#include "boost/thread/tss.hpp"
#include "boost/weak_ptr.hpp"

"""

_SHARED_COL_CLASS = """\
// --- Red-Seg shared im2col buffer (added by Red-Seg's make setup; docs/install.md) -------------
// Upstream, every convolution layer owns a buffer for one image's im2col columns, and a net
// holds the sum of them: about 5 GB for Red-Seg's VGG16 at 1072x712, 1.76 GB of it conv1_2's.
// The idea of BVLC/caffe pull request #2016 ("Share convolution buffers to reduce memory usage"),
// written anew for Red-Seg: the columns are scratch space, so one buffer as large as the largest
// layer's can serve every layer.
//
// Same arithmetic. Every use writes the part of the buffer it then reads: im2col before the
// forward and weight GEMMs, a beta = 0 GEMM before col2im. The one reuse across calls,
// DeconvolutionLayer::Backward (the columns of weight_*_gemm read again by forward_*_gemm with
// skip_im2col), happens inside one layer's Backward with no other layer in between. The GEMMs get
// the same operands, so the results are bit for bit upstream's.
//
// Thread safety. PR #2016's caveat is that two nets must not run convolutions at the same time.
// Here the buffer belongs to a thread, not to the process: each thread that runs a convolution
// gets its own (a boost::thread_specific_ptr, as Caffe keeps its per-thread Caffe singleton), and
// a layer asks for the calling thread's buffer on every call. One thread runs one layer at a time
// (Red-Seg's training net and the test net that shares its weights run one after the other, as
// Caffe's Solver runs them); solvers in other threads (multi-GPU P2PSync/NCCL training, one thread
// per GPU) use other buffers. On a GPU the kernels of one thread go to its default stream in
// order, so a GEMM that reads the columns is done before the next im2col overwrites them; freeing
// the buffer to grow it (cudaFree) waits for the device; a thread that changes device gets a new
// buffer there.
//
// Memory. The buffer grows to the largest layer's columns on first use (the smaller one is freed
// first) and is freed with the last layer that used it. A 1x1 convolution reads its input as its
// columns and takes no buffer (upstream allocates its own in backward_*_gemm without using it).
// REDSEG_SHARED_COL=0 in the environment when a layer is set up gives that layer its own buffer,
// exactly as upstream; `make setup SHARED_COL=0` builds Caffe without this patch.
class SharedColBuffer {
 public:
  SharedColBuffer() : bytes_(0), gpu_device_(-1) {}

  // The buffer of the calling thread; *holder (a layer's) keeps it alive.
  static SharedColBuffer* ForThisThread(shared_ptr<SharedColBuffer>* holder) {
    if (!thread_buffer_.get()) {
      thread_buffer_.reset(new boost::weak_ptr<SharedColBuffer>());
    }
    shared_ptr<SharedColBuffer> buffer = thread_buffer_->lock();
    if (!buffer) {
      buffer.reset(new SharedColBuffer());
      *thread_buffer_ = buffer;
    }
    if (*holder != buffer) {
      *holder = buffer;
    }
    return buffer.get();
  }

  // At least `bytes` bytes; for the GPU, on the current device.
  SyncedMemory* memory(size_t bytes, bool gpu) {
    int device = -1;
#ifndef CPU_ONLY
    if (gpu) {
      CUDA_CHECK(cudaGetDevice(&device));
    }
#endif
    if (memory_ && (bytes > bytes_ ||
        (gpu && gpu_device_ >= 0 && device != gpu_device_))) {
      memory_.reset();
    }
    if (!memory_) {
      memory_.reset(new SyncedMemory(bytes));
      bytes_ = bytes;
      gpu_device_ = -1;
    }
    if (gpu) {
      gpu_device_ = device;
    }
    return memory_.get();
  }

 private:
  static boost::thread_specific_ptr<boost::weak_ptr<SharedColBuffer> >
      thread_buffer_;
  shared_ptr<SyncedMemory> memory_;
  size_t bytes_;
  int gpu_device_;
};

boost::thread_specific_ptr<boost::weak_ptr<SharedColBuffer> >
    SharedColBuffer::thread_buffer_;

template <typename Dtype>
Dtype* BaseConvolutionLayer<Dtype>::col_buffer_cpu() {
  if (!share_col_buffer_) {
    return col_buffer_.mutable_cpu_data();
  }
  if (is_1x1_) {
    return NULL;  // not read: a 1x1 convolution's columns are its input
  }
  SyncedMemory* columns = SharedColBuffer::ForThisThread(&shared_col_buffer_)
      ->memory(col_buffer_.count() * sizeof(Dtype), false);
  return static_cast<Dtype*>(columns->mutable_cpu_data());
}

#ifndef CPU_ONLY
template <typename Dtype>
Dtype* BaseConvolutionLayer<Dtype>::col_buffer_gpu() {
  if (!share_col_buffer_) {
    return col_buffer_.mutable_gpu_data();
  }
  if (is_1x1_) {
    return NULL;  // not read: a 1x1 convolution's columns are its input
  }
  SyncedMemory* columns = SharedColBuffer::ForThisThread(&shared_col_buffer_)
      ->memory(col_buffer_.count() * sizeof(Dtype), true);
  return static_cast<Dtype*>(columns->mutable_gpu_data());
}
#endif  // !CPU_ONLY

"""

_SHARED_COL_SETUP = """\
  // Red-Seg shared im2col buffer: REDSEG_SHARED_COL=0 gives this layer its own, as upstream.
  const char* shared_col = std::getenv("REDSEG_SHARED_COL");
  share_col_buffer_ = !(shared_col && std::string(shared_col) == "0");
"""


def _shared_col_header(text: str) -> str | None:
    if _SHARED_COL_MARK in text:
        return None if "bool share_col_buffer_;" in text else ""
    for old, new in (
        ("namespace caffe {\n\n", "namespace caffe {\n\n" + _SHARED_COL_DECLARE),
        (": Layer<Dtype>(param) {}", ": Layer<Dtype>(param), share_col_buffer_(true) {}"),
        ("  Blob<Dtype> col_buffer_;\n", "  Blob<Dtype> col_buffer_;\n" + _SHARED_COL_MEMBERS),
    ):
        if text.count(old) != 1:
            return ""
        text = text.replace(old, new)
    return text


# Where upstream's base_conv_layer.cpp reaches into col_buffer_'s memory, and how often: all of
# them go through the layer's accessor. CPU: forward_cpu_gemm 2, backward_cpu_gemm 1,
# weight_cpu_gemm 2; the GPU functions alike.
_COL_USES = (
    ("col_buffer_.mutable_cpu_data()", 3, "col_buffer_cpu()"),
    ("col_buffer_.cpu_data()", 2, "col_buffer_cpu()"),
    ("col_buffer_.mutable_gpu_data()", 3, "col_buffer_gpu()"),
    ("col_buffer_.gpu_data()", 2, "col_buffer_gpu()"),
)


def _shared_col_source(text: str) -> str | None:
    if _SHARED_COL_MARK in text:  # patched: only the accessors themselves still reach the memory
        left = [text.count(use) for use, _, _ in _COL_USES]
        return None if left == [1, 0, 1, 0] and "share_col_buffer_ = " in text else ""
    for use, n, accessor in _COL_USES:
        if text.count(use) != n:
            return ""
        text = text.replace(use, accessor)
    setup = re.compile(r"void BaseConvolutionLayer<Dtype>::LayerSetUp\([^)]*\)\s*\{\n")
    for pattern, insert, before in (
        (re.compile(r'(?=#include "caffe/filler\.hpp"\n)'), _SHARED_COL_INCLUDES, True),
        (re.compile(r"namespace caffe \{\n\n"), _SHARED_COL_CLASS, False),
        (setup, _SHARED_COL_SETUP, False),
    ):
        m = list(pattern.finditer(text))
        if len(m) != 1:
            return ""
        at = m[0].start() if before else m[0].end()
        text = text[:at] + insert + text[at:]
    return text


# --- shared diff memory (SHARED_DIFF) ---------------------------------------------------------------
# Upstream, every blob of a net keeps its own diff, written in backward and kept afterwards: for
# Red-Seg's stage-1 train net at 1072x712 about 1.4 GB, as much as the activations. A blob's diff
# is only needed from the backward step of the layer that consumes the blob (which writes it) to
# the backward step of the layer that produced it (which reads it): a live interval in the
# backward pass. These edits let blobs whose intervals do not overlap keep their diffs in the same
# memory (memory planning by liveness, as MXNet's planner does), written anew for this project.
# Off unless REDSEG_SHARED_DIFF=1 when the Net is constructed: with it on, the diffs of the
# intermediate blobs are not kept after backward (the parameters' diffs are untouched).
_SHARED_DIFF_MARK = "Red-Seg shared diff memory"

_SHARED_DIFF_MEMBERS = """\
  // Red-Seg shared diff memory (added by Red-Seg's make setup; docs/install.md): with
  // REDSEG_SHARED_DIFF=1 at construction, the diffs of the blobs in shared_diff_blobs_ live in
  // the buffers of shared_diff_pool_ (blob i in buffer shared_diff_slot_[i]), bound before each
  // backward pass (net.cpp).
  void PlanSharedDiffs();
  void BindSharedDiffs();
  vector<int> shared_diff_blobs_;
  vector<int> shared_diff_slot_;
  vector<shared_ptr<Blob<Dtype> > > shared_diff_pool_;
  vector<int> shared_diff_capacity_;
  // Red-Seg shared data memory: with REDSEG_SHARED_DATA=1 too, the data of the blobs in
  // shared_data_blobs_ and the diffs of those in shared_data_diffs_ (taken over from the shared
  // diff memory) live in one arena, item n (data, then diffs) from step shared_data_from_[n] to
  // shared_data_to_[n] of an iteration (net.cpp).
  void PlanSharedData();
  void BindSharedData();
  void CheckSharedData();
  vector<int> shared_data_blobs_;
  vector<int> shared_data_diffs_;
  vector<int> shared_data_from_;
  vector<int> shared_data_to_;
  vector<shared_ptr<SyncedMemory> > shared_data_memory_;
  shared_ptr<SyncedMemory> shared_data_arena_;
  bool shared_data_gpu_;
"""

_SHARED_DIFF_PLAN = """\
// --- Red-Seg shared diff memory (added by Red-Seg's make setup; docs/install.md) --------------
// Upstream, every blob keeps its own diff. In a backward pass (layers last to first) a blob's
// diff is written by the Backward of the layer(s) that take it as bottom and last read by the
// Backward of the layer that produced it as top: between those steps it is live, outside them
// its content is never used again by the net. Blobs whose live intervals do not overlap can
// keep their diffs in the same memory; with REDSEG_SHARED_DIFF=1 when the net is constructed,
// PlanSharedDiffs assigns the diffs to a few buffers by interval colouring (best fit by size)
// and BindSharedDiffs points the blobs' diffs at them before every backward pass, growing a
// buffer to its largest blob's current shape (the net may have been reshaped since).
//
// Same arithmetic. A blob shares only if every layer that writes its diff overwrites all of it
// without reading it first (no accumulation), so what was in the memory before never reaches a
// result. Checked layer by layer in this source (CPU, GPU and cuDNN): Convolution (a beta = 0
// GEMM, then col2im, which zeroes its output; 1x1: the GEMM alone), Deconvolution (a beta = 0
// GEMM), ReLU, Sigmoid, TanH and Dropout (elementwise assignment; in place too), Pooling (zeroed,
// then accumulated), Concat (each bottom copied whole), Eltwise (copy, scale or assignment),
// Split (caffe_add of its first two tops, then axpy) and Crop (bottom 0: zeroed, then copied).
// Crop's second bottom (the reference shape) is never written; Python layers may accumulate
// (bottom.diff[...] += ...) and other layer types may alias diffs (Flatten, Reshape): blobs
// they write, and blobs they produce, keep their own diff. So do blobs that do not need
// backward, the net's inputs and outputs, and loss tops (whose diff holds the loss weight).
static bool RedSegDiffWriter(const string& type, int bottom_id) {
  if (type == "Crop") {
    return bottom_id == 0;
  }
  return type == "Convolution" || type == "Deconvolution" || type == "ReLU" ||
      type == "Sigmoid" || type == "TanH" || type == "Dropout" ||
      type == "Pooling" || type == "Concat" || type == "Eltwise" ||
      type == "Split";
}

// Each blob's producer (the lowest layer with it as top; -1: none) and highest consumer (the
// highest layer with it as bottom; -1: none), from a net's bottom and top blob ids per layer.
static void RedSegBlobSpans(const vector<vector<int> >& bottom_ids,
    const vector<vector<int> >& top_ids, int num_blobs, vector<int>* producer,
    vector<int>* consumer) {
  producer->assign(num_blobs, -1);
  consumer->assign(num_blobs, -1);
  for (int i = 0; i < bottom_ids.size(); ++i) {
    for (int j = 0; j < bottom_ids[i].size(); ++j) {
      (*consumer)[bottom_ids[i][j]] = std::max((*consumer)[bottom_ids[i][j]], i);
    }
    for (int k = 0; k < top_ids[i].size(); ++k) {
      if ((*producer)[top_ids[i][k]] < 0) {
        (*producer)[top_ids[i][k]] = i;
      }
    }
  }
}

template <typename Dtype>
void Net<Dtype>::PlanSharedDiffs() {
  const int num_blobs = blobs_.size();
  const int num_layers = layers_.size();
  vector<int> producer, consumer;
  RedSegBlobSpans(bottom_id_vecs_, top_id_vecs_, num_blobs, &producer, &consumer);
  vector<bool> ok(num_blobs, true);
  for (int i = 0; i < num_layers; ++i) {
    const string type = layers_[i]->type();
    for (int j = 0; j < bottom_id_vecs_[i].size(); ++j) {
      if (!layer_need_backward_[i] || !bottom_need_backward_[i][j] ||
          !RedSegDiffWriter(type, j)) {
        ok[bottom_id_vecs_[i][j]] = false;
      }
    }
    for (int k = 0; k < top_id_vecs_[i].size(); ++k) {
      if (layers_[i]->loss(k) != Dtype(0) || !RedSegDiffWriter(type, 0)) {
        ok[top_id_vecs_[i][k]] = false;
      }
    }
  }
  for (int i = 0; i < net_input_blob_indices_.size(); ++i) {
    ok[net_input_blob_indices_[i]] = false;
  }
  for (int i = 0; i < net_output_blob_indices_.size(); ++i) {
    ok[net_output_blob_indices_[i]] = false;
  }
  // Eligible blobs in the order their diffs come alive in backward (highest consumer first).
  vector<std::pair<int, int> > order;
  for (int b = 0; b < num_blobs; ++b) {
    if (ok[b] && producer[b] >= 0 && consumer[b] > producer[b] &&
        blob_need_backward_[b] && blob_loss_weights_[b] == Dtype(0)) {
      order.push_back(std::make_pair(-consumer[b], b));
    }
  }
  std::sort(order.begin(), order.end());
  // Interval colouring: a buffer is free for blob b once its last blob's producer ran (a lower
  // layer index than b's consumer); among the free ones the smallest that fits, else the largest.
  vector<int> slot_busy_from;  // producer of the buffer's last blob
  vector<int> slot_count;
  for (int n = 0; n < order.size(); ++n) {
    const int b = order[n].second;
    const int count = blobs_[b]->count();
    int best = -1;
    for (int s = 0; s < slot_count.size(); ++s) {
      if (slot_busy_from[s] <= consumer[b]) {
        continue;  // still live during b's interval
      }
      if (best < 0) {
        best = s;
      } else if (slot_count[best] >= count) {
        if (slot_count[s] >= count && slot_count[s] < slot_count[best]) best = s;
      } else if (slot_count[s] > slot_count[best]) {
        best = s;
      }
    }
    if (best < 0) {
      best = slot_count.size();
      slot_count.push_back(0);
      slot_busy_from.push_back(num_layers);
    }
    slot_count[best] = std::max(slot_count[best], count);
    slot_busy_from[best] = producer[b];
    shared_diff_blobs_.push_back(b);
    shared_diff_slot_.push_back(best);
  }
  for (int s = 0; s < slot_count.size(); ++s) {
    shared_diff_pool_.push_back(shared_ptr<Blob<Dtype> >(new Blob<Dtype>()));
    shared_diff_capacity_.push_back(0);
  }
  size_t own = 0, shared = 0;
  for (int n = 0; n < shared_diff_blobs_.size(); ++n) {
    own += blobs_[shared_diff_blobs_[n]]->count();
  }
  for (int s = 0; s < slot_count.size(); ++s) {
    shared += slot_count[s];
  }
  LOG_IF(INFO, Caffe::root_solver()) << "Red-Seg shared diff memory: "
      << shared_diff_blobs_.size() << " blob diffs in " << slot_count.size()
      << " buffers, " << shared * sizeof(Dtype) << " bytes instead of "
      << own * sizeof(Dtype);
}

template <typename Dtype>
void Net<Dtype>::BindSharedDiffs() {
  if (shared_diff_blobs_.empty()) {
    return;
  }
  // First every buffer to its largest blob's current count, then the blobs onto the buffers
  // (a buffer that grows gets new memory: no blob may be bound to the old one).
  vector<int> need(shared_diff_pool_.size(), 0);
  for (int n = 0; n < shared_diff_blobs_.size(); ++n) {
    const int s = shared_diff_slot_[n];
    need[s] = std::max(need[s], blobs_[shared_diff_blobs_[n]]->count());
  }
  for (int s = 0; s < shared_diff_pool_.size(); ++s) {
    if (need[s] > shared_diff_capacity_[s]) {
      shared_diff_pool_[s]->Reshape(vector<int>(1, need[s]));
      shared_diff_capacity_[s] = need[s];
    }
  }
  for (int n = 0; n < shared_diff_blobs_.size(); ++n) {
    Blob<Dtype>* blob = blobs_[shared_diff_blobs_[n]].get();
    if (blob->count() == 0) {
      continue;
    }
    Blob<Dtype>* buffer = shared_diff_pool_[shared_diff_slot_[n]].get();
    buffer->Reshape(blob->shape());  // within its capacity: the same memory
    blob->ShareDiff(*buffer);
  }
}

"""

_SHARED_DATA_PLAN = """\
// --- Red-Seg shared data memory (added by Red-Seg's make setup; docs/install.md) --------------
// Upstream, every blob keeps its data (the activations) from one forward to the next, and with
// the shared diff memory above the diffs still take buffers of their own. But in one training
// iteration (forward, layers first to last, then backward, last to first) a blob's data is
// written by the Forward of its producer and read last by the Backward of its producer (the
// lowest layer that touches it): after that step nothing reads it before the next forward
// writes it again. And the shared diff buffers are live only between two backward steps. With
// REDSEG_SHARED_DATA=1 (and REDSEG_SHARED_DIFF=1) when the net is constructed, both live in one
// arena, placed by their live intervals on the iteration's timeline (forward step i at t = i,
// backward step i at t = 2L - 1 - i), largest first, each at the lowest offset that no
// overlapping interval holds (greedy by size): the diffs of the lower layers' backward steps
// reuse the memory of the upper layers' activations. For Red-Seg's VGG16 at 1072x712 the arena
// is the activations' size, and the diffs take no memory of their own. Nothing is allocated or
// freed per iteration; when a blob outgrows its place (a larger input), it takes memory of its
// own (Blob::Reshape) and the plan is made again, for the new shapes, after the backward pass.
//
// Same arithmetic. A blob's data takes part only if every layer that has it as top writes all
// of it in Forward without reading it first: checked layer by layer in this source,
// Convolution and Deconvolution (a beta = 0 GEMM; col2im zeroes its output), ReLU, Sigmoid,
// TanH and Dropout (elementwise assignment; in place they read what the layer below wrote in
// the same forward), Pooling (set, then max or sum), Concat and Crop (copies that cover the
// top) and Eltwise (set or assigned); Split's tops share their bottom's data. The diff buffers
// keep the shared diff memory's rule (overwritten, never accumulated). Never the net's inputs
// and outputs, loss tops, tops of other layer types (Input keeps what the user set), and no blob
// a Python layer touches (it may hold a numpy view of the memory). So: the data of the
// intermediate blobs is not kept after backward, and one backward pass follows each forward
// pass. pycaffe users who read activations after backward, or run backward twice, leave
// REDSEG_SHARED_DATA unset (the default); Red-Seg's training driver sets it.
static bool RedSegDataWriter(const string& type) {
  return type == "Convolution" || type == "Deconvolution" || type == "ReLU" ||
      type == "Sigmoid" || type == "TanH" || type == "Dropout" ||
      type == "Pooling" || type == "Concat" || type == "Crop" ||
      type == "Eltwise";
}

template <typename Dtype>
void Net<Dtype>::PlanSharedData() {
  const int num_blobs = blobs_.size();
  const int num_layers = layers_.size();
  vector<int> producer, consumer;
  RedSegBlobSpans(bottom_id_vecs_, top_id_vecs_, num_blobs, &producer, &consumer);
  vector<bool> ok(num_blobs, true);
  for (int i = 0; i < num_layers; ++i) {
    const string type = layers_[i]->type();
    for (int j = 0; j < bottom_id_vecs_[i].size(); ++j) {
      if (type == "Python") {
        ok[bottom_id_vecs_[i][j]] = false;
      }
    }
    for (int k = 0; k < top_id_vecs_[i].size(); ++k) {
      if (!RedSegDataWriter(type) || layers_[i]->loss(k) != Dtype(0)) {
        ok[top_id_vecs_[i][k]] = false;
      }
    }
  }
  for (int i = 0; i < net_input_blob_indices_.size(); ++i) {
    ok[net_input_blob_indices_[i]] = false;
  }
  for (int i = 0; i < net_output_blob_indices_.size(); ++i) {
    ok[net_output_blob_indices_[i]] = false;
  }
  const int t_end = 2 * num_layers - 1;  // backward step i is at t_end - i
  for (int b = 0; b < num_blobs; ++b) {
    if (ok[b] && producer[b] >= 0 && blob_loss_weights_[b] == Dtype(0)) {
      shared_data_blobs_.push_back(b);
      shared_data_from_.push_back(producer[b]);
      shared_data_to_.push_back(t_end - producer[b]);
    }
  }
  // The diffs the shared diff memory chose, each now with its own interval in the arena (from
  // the backward step of its consumer to that of its producer) instead of in its buffers.
  shared_data_diffs_.swap(shared_diff_blobs_);
  shared_diff_slot_.clear();
  shared_diff_pool_.clear();
  shared_diff_capacity_.clear();
  for (int n = 0; n < shared_data_diffs_.size(); ++n) {
    const int b = shared_data_diffs_[n];
    shared_data_from_.push_back(t_end - consumer[b]);
    shared_data_to_.push_back(t_end - producer[b]);
  }
  BindSharedData();
}

template <typename Dtype>
void Net<Dtype>::BindSharedData() {
  const int num_data = shared_data_blobs_.size();
  const int num_items = num_data + shared_data_diffs_.size();
  // Each item's bytes now, rounded up to 64.
  vector<size_t> bytes(num_items);
  for (int n = 0; n < num_items; ++n) {
    const size_t count = blobs_[n < num_data ? shared_data_blobs_[n] :
        shared_data_diffs_[n - num_data]]->count();
    bytes[n] = (std::max(count, size_t(1)) * sizeof(Dtype) + 63) / 64 * 64;
  }
  // Greedy by size: largest first, each at the lowest offset free throughout its interval.
  vector<std::pair<size_t, int> > order;
  for (int n = 0; n < num_items; ++n) {
    order.push_back(std::make_pair(bytes[n], -n));
  }
  std::sort(order.rbegin(), order.rend());
  vector<size_t> offset(num_items, 0);
  vector<int> placed;
  size_t total = 0;
  for (int m = 0; m < num_items; ++m) {
    const int n = -order[m].second;
    vector<std::pair<size_t, size_t> > taken;  // [begin, end) of overlapping placed items
    for (int q = 0; q < placed.size(); ++q) {
      const int p = placed[q];
      if (shared_data_from_[p] <= shared_data_to_[n] &&
          shared_data_from_[n] <= shared_data_to_[p]) {
        taken.push_back(std::make_pair(offset[p], offset[p] + bytes[p]));
      }
    }
    std::sort(taken.begin(), taken.end());
    size_t at = 0;
    for (int q = 0; q < taken.size(); ++q) {
      if (at + bytes[n] <= taken[q].first) {
        break;
      }
      at = std::max(at, taken[q].second);
    }
    offset[n] = at;
    placed.push_back(n);
    total = std::max(total, at + bytes[n]);
  }
  // The arena: kept while the plan fits in it. Each item gets a SyncedMemory that points into it.
  const bool gpu = Caffe::mode() == Caffe::GPU;
  // The old arena and places are kept alive until nothing points into them (below).
  shared_ptr<SyncedMemory> old_arena = shared_data_arena_;
  vector<shared_ptr<SyncedMemory> > old_places = shared_data_memory_;
  std::set<const SyncedMemory*> old_memory;
  for (int n = 0; n < old_places.size(); ++n) {
    old_memory.insert(old_places[n].get());
  }
  if (!shared_data_arena_ || shared_data_arena_->size() < total || shared_data_gpu_ != gpu) {
    shared_data_arena_.reset(new SyncedMemory(total));
    shared_data_gpu_ = gpu;
  }
  char* base = static_cast<char*>(gpu ? shared_data_arena_->mutable_gpu_data() :
      shared_data_arena_->mutable_cpu_data());
  shared_data_memory_.resize(num_items);
  size_t own = 0;
  for (int n = 0; n < num_items; ++n) {
    shared_ptr<SyncedMemory> memory(new SyncedMemory(bytes[n]));
    if (gpu) {
      memory->set_gpu_data(base + offset[n]);
    } else {
      memory->set_cpu_data(base + offset[n]);
    }
    shared_data_memory_[n] = memory;
    own += bytes[n];
    if (n < num_data) {
      blobs_[shared_data_blobs_[n]]->set_data_memory(memory);
    } else {
      blobs_[shared_data_diffs_[n - num_data]]->set_diff_memory(memory);
    }
  }
  // Blobs that still share an item's old place (Split's tops share their bottom's data until
  // their next Reshape) get memory of their own: nothing points into an old arena or an old
  // place after this.
  for (int b = 0; b < blobs_.size(); ++b) {
    if (blobs_[b]->count() == 0) {
      continue;  // may have no memory at all (Blob::data() would fail); reads none
    }
    const size_t size = blobs_[b]->count() * sizeof(Dtype);
    if (old_memory.count(blobs_[b]->data().get())) {
      blobs_[b]->set_data_memory(shared_ptr<SyncedMemory>(new SyncedMemory(size)));
    }
    if (old_memory.count(blobs_[b]->diff().get())) {
      blobs_[b]->set_diff_memory(shared_ptr<SyncedMemory>(new SyncedMemory(size)));
    }
  }
  LOG_IF(INFO, Caffe::root_solver()) << "Red-Seg shared data memory: "
      << num_data << " blobs' data and " << num_items - num_data << " blobs' diffs in one arena of "
      << total << " bytes instead of " << own;
}

// After a full backward pass: a blob or diff buffer that left its place (it outgrew it) means
// the plan is made again for the current shapes (every item is dead now).
template <typename Dtype>
void Net<Dtype>::CheckSharedData() {
  const int num_data = shared_data_blobs_.size();
  for (int n = 0; n < shared_data_memory_.size(); ++n) {
    const shared_ptr<SyncedMemory>& now = n < num_data ?
        blobs_[shared_data_blobs_[n]]->data() : blobs_[shared_data_diffs_[n - num_data]]->diff();
    if (now != shared_data_memory_[n]) {
      BindSharedData();
      return;
    }
  }
}

"""

_SHARED_DATA_INIT = """\
  // Red-Seg shared data memory: only with REDSEG_SHARED_DATA=1 and the shared diff memory (the
  // data of intermediate blobs is then not kept after backward).
  shared_data_gpu_ = false;
  const char* shared_data = std::getenv("REDSEG_SHARED_DATA");
  if (shared_data && std::string(shared_data) == "1" && !shared_diff_blobs_.empty()) {
    PlanSharedData();
  }
"""

_SHARED_DATA_BACKWARD = """\
  if (end == 0 && !shared_data_blobs_.empty()) {
    CheckSharedData();  // Red-Seg shared data memory: a new plan if a blob outgrew its place
  }
"""

# Blob's two setters, for the above: a blob's data or diff in memory the net gives it.
_SHARED_DATA_BLOB = """\
  /// @brief Red-Seg shared data memory (added by Red-Seg's make setup; docs/install.md): keep this
  ///        blob's data (diff) in `memory`, which the net places in its arena (net.cpp).
  void set_data_memory(const shared_ptr<SyncedMemory>& memory) {
    CHECK_GE(memory->size(), count_ * sizeof(Dtype));
    data_ = memory;
  }
  void set_diff_memory(const shared_ptr<SyncedMemory>& memory) {
    CHECK_GE(memory->size(), count_ * sizeof(Dtype));
    diff_ = memory;
  }
"""

_SHARED_DIFF_INIT = """\
  // Red-Seg shared diff memory: only with REDSEG_SHARED_DIFF=1 (the diffs of intermediate blobs
  // are then not kept after backward).
  const char* shared_diff = std::getenv("REDSEG_SHARED_DIFF");
  if (shared_diff && std::string(shared_diff) == "1") {
    PlanSharedDiffs();
  }
"""

_SHARED_DIFF_BACKWARD = """\
  BindSharedDiffs();  // Red-Seg shared diff memory (nothing unless REDSEG_SHARED_DIFF=1)
"""

# Blob::Reshape: a blob whose diff shares memory (ShareDiff) and grows within its capacity gets
# its own diff again when the shared memory is too small, instead of running past its end.
_SHARED_DIFF_RESHAPE = """\
  } else if (diff_ && diff_->size() < count_ * sizeof(Dtype)) {
    // Red-Seg shared diff memory: a diff shared with a smaller blob, too small now: its own again.
    diff_.reset(new SyncedMemory(capacity_ * sizeof(Dtype)));
  }
  if (data_ && data_->size() < count_ * sizeof(Dtype)) {
    // Red-Seg shared data memory: data placed in a net's arena, too small now: its own again.
    data_.reset(new SyncedMemory(capacity_ * sizeof(Dtype)));
"""


def _shared_diff_header(text: str) -> str | None:
    if _SHARED_DIFF_MARK in text:
        return None if "void BindSharedDiffs();" in text else ""
    old = "  bool debug_info_;\n"
    if text.count(old) != 1:
        return ""
    return text.replace(old, old + _SHARED_DIFF_MEMBERS)


def _shared_diff_source(text: str) -> str | None:
    if _SHARED_DIFF_MARK in text:
        done = "void Net<Dtype>::PlanSharedDiffs()" in text and text.count("BindSharedDiffs();") == 1
        return None if done and 'std::getenv("REDSEG_SHARED_DIFF")' in text else ""
    for pattern, insert, before in (
        (re.compile(r"(?=#include <map>\n)"), "#include <cstdlib>\n", True),
        (re.compile(r"(?=INSTANTIATE_CLASS\(Net\);\n)"), _SHARED_DIFF_PLAN, True),
        (re.compile(r"  debug_info_ = param\.debug_info\(\);\n"), _SHARED_DIFF_INIT, False),
        (
            re.compile(r"void Net<Dtype>::BackwardFromTo\(int start, int end\) \{\n(?:  CHECK_[A-Z]+\([^;]*\);\n)+"),
            _SHARED_DIFF_BACKWARD,
            False,
        ),
    ):
        m = list(pattern.finditer(text))
        if len(m) != 1:
            return ""
        at = m[0].start() if before else m[0].end()
        text = text[:at] + insert + text[at:]
    return text


_SHARED_DATA_MARK = "Red-Seg shared data memory"


def _shared_data_source(text: str) -> str | None:
    if _SHARED_DATA_MARK in text:
        done = "void Net<Dtype>::PlanSharedData()" in text and text.count("CheckSharedData();") == 1
        return None if done and 'std::getenv("REDSEG_SHARED_DATA")' in text else ""
    if "void Net<Dtype>::PlanSharedDiffs()" not in text:
        return ""  # applied after shared-diff, whose buffers it places
    for pattern, insert, before in (
        (re.compile(r"(?=INSTANTIATE_CLASS\(Net\);\n)"), _SHARED_DATA_PLAN, True),
        (re.compile(r"    PlanSharedDiffs\(\);\n  \}\n"), _SHARED_DATA_INIT, False),
        (re.compile(r"      after_backward_\[c\]->run\(i\);\n    \}\n  \}\n"), _SHARED_DATA_BACKWARD, False),
    ):
        m = list(pattern.finditer(text))
        if len(m) != 1:
            return ""
        at = m[0].start() if before else m[0].end()
        text = text[:at] + insert + text[at:]
    return text


def _shared_data_blob(text: str) -> str | None:
    if _SHARED_DATA_MARK in text:
        return None if "void set_data_memory(" in text and "void set_diff_memory(" in text else ""
    old = "  void ShareDiff(const Blob& other);\n"
    if text.count(old) != 1:
        return ""
    return text.replace(old, old + _SHARED_DATA_BLOB)


def _shared_diff_blob(text: str) -> str | None:
    if _SHARED_DIFF_MARK in text:
        done = "diff_->size() < count_ * sizeof(Dtype)" in text and "data_->size() < count_ * sizeof(Dtype)" in text
        return None if done else ""
    old = "    diff_.reset(new SyncedMemory(capacity_ * sizeof(Dtype)));\n  }\n}\n"
    if text.count(old) != 1:
        return ""
    return text.replace(old, old[: -len("  }\n}\n")] + _SHARED_DIFF_RESHAPE + "  }\n}\n")


PATCHES = (
    Patch(
        "protobuf-3.21",
        "src/caffe/util/io.cpp",
        "protobuf >= 3.18 removed the two-argument SetTotalBytesLimit (the one-argument form exists since 3.6)",
        _protobuf_321,
    ),
    Patch(
        "cuda13-device-query",
        "src/caffe/common.cpp",
        "CUDA 13 removed three cudaDeviceProp fields that Caffe::DeviceQuery only prints",
        _cuda13_device_query,
    ),
    Patch(
        "boost-python-name",
        "cmake/Dependencies.cmake",
        "Boost >= 1.67 names Boost.Python python3X; upstream looks for python-py3X and may pick another Python's",
        _boost_python_name,
    ),
)


# What SHARED_COL=1 (the default) adds to the build fixes above: one shared im2col buffer.
SHARED_COL_PATCHES = (
    Patch(
        "shared-col-buffer-decl",
        "include/caffe/layers/base_conv_layer.hpp",
        "the shared im2col buffer: the layer's switch, the reference to its thread's buffer, the accessors",
        _shared_col_header,
    ),
    Patch(
        "shared-col-buffer",
        "src/caffe/layers/base_conv_layer.cpp",
        "the shared im2col buffer: one per thread for all convolution layers (BVLC/caffe PR #2016's idea)",
        _shared_col_source,
    ),
)


# What SHARED_DIFF=1 (the default) adds: blob diffs sharing memory by liveness (REDSEG_SHARED_DIFF=1).
SHARED_DIFF_PATCHES = (
    Patch(
        "shared-diff-decl",
        "include/caffe/net.hpp",
        "shared diff memory: the net's plan and buffers",
        _shared_diff_header,
    ),
    Patch(
        "shared-diff",
        "src/caffe/net.cpp",
        "shared diff memory: blob diffs whose backward live intervals do not overlap share buffers",
        _shared_diff_source,
    ),
    Patch(
        "shared-data-decl",
        "include/caffe/blob.hpp",
        "shared data memory: a blob's data or diff in memory its net gives it",
        _shared_data_blob,
    ),
    Patch(
        "shared-data",
        "src/caffe/net.cpp",
        "shared data memory: activations and diff buffers in one arena by liveness (REDSEG_SHARED_DATA=1)",
        _shared_data_source,
    ),
    Patch(
        "shared-diff-reshape",
        "src/caffe/blob.cpp",
        "shared diff memory: a blob grown past its shared diff's memory gets its own diff again",
        _shared_diff_blob,
    ),
)


def shared_col_default() -> bool:
    """``SHARED_COL`` from the environment (``make setup SHARED_COL=0``): 1 (the default) or 0."""
    value = os.environ.get("SHARED_COL", "1").strip() or "1"
    if value not in ("0", "1"):
        raise SourceError(f"SHARED_COL={value}: give 1 (share one im2col buffer, the default) or 0 (upstream's)")
    return value == "1"


def shared_diff_default() -> bool:
    """``SHARED_DIFF`` from the environment (``make setup SHARED_DIFF=0``): 1 (the default) or 0."""
    value = os.environ.get("SHARED_DIFF", "1").strip() or "1"
    if value not in ("0", "1"):
        raise SourceError(f"SHARED_DIFF={value}: give 1 (blob diffs may share memory, the default) or 0 (upstream's)")
    return value == "1"


def patch_set(shared_col: bool = True, shared_diff: bool = True) -> tuple[Patch, ...]:
    """The patches a build gets: the build fixes, with ``shared_col`` the shared im2col buffer,
    with ``shared_diff`` the shared diff memory."""
    return PATCHES + (SHARED_COL_PATCHES if shared_col else ()) + (SHARED_DIFF_PATCHES if shared_diff else ())


def patchset_id(shared_col: bool = True, shared_diff: bool = True) -> str:
    """A short hash of what the patches do, part of the build cache key (new patches, new build).

    It covers each patch's name, file and code and the text it inserts, not the explanations, so
    rewording a comment does not force a rebuild. Without the shared im2col buffer it is the id of
    the build fixes alone (the id builds had before that patch existed), so ``SHARED_COL=0`` and
    the default are two builds side by side in the cache; likewise without the shared diff memory
    it is the id the build had before that patch existed.
    """
    h = hashlib.sha256()
    for p in PATCHES:
        h.update(f"{p.name}\0{p.file}\0{inspect.getsource(p.apply)}".encode())
    h.update(f"{_CUDA13_FIELDS}{_BOOST_PYTHON}".encode())
    if shared_col:
        for p in SHARED_COL_PATCHES:
            h.update(f"{p.name}\0{p.file}\0{inspect.getsource(p.apply)}".encode())
        inserted = (
            _SHARED_COL_DECLARE,
            _SHARED_COL_MEMBERS,
            _SHARED_COL_INCLUDES,
            _SHARED_COL_CLASS,
            _SHARED_COL_SETUP,
        )
        h.update(f"{_SHARED_COL_MARK}{_COL_USES}{''.join(inserted)}".encode())
    if shared_diff:
        for p in SHARED_DIFF_PATCHES:
            h.update(f"{p.name}\0{p.file}\0{inspect.getsource(p.apply)}".encode())
        inserted = (
            _SHARED_DIFF_MEMBERS,
            _SHARED_DIFF_PLAN,
            _SHARED_DIFF_INIT,
            _SHARED_DIFF_BACKWARD,
            _SHARED_DIFF_RESHAPE,
            _SHARED_DATA_PLAN,
            _SHARED_DATA_INIT,
            _SHARED_DATA_BACKWARD,
            _SHARED_DATA_BLOB,
        )
        h.update(f"{_SHARED_DIFF_MARK}{_SHARED_DATA_MARK}{''.join(inserted)}".encode())
    return h.hexdigest()[:8]


def apply_patches(root: Path, shared_col: bool = True, shared_diff: bool = True) -> list[str]:
    """Apply :func:`patch_set` to the tree at ``root``; return the names applied (not already there)."""
    root = Path(root)
    done = []
    for p in patch_set(shared_col, shared_diff):
        f = root / p.file
        if not f.is_file():
            raise SourceError(f"patch {p.name}: {f} not found; is {root} a BVLC Caffe tree?")
        new = p.apply(f.read_text())
        if new is None:
            log.info("patch %s: already in the source", p.name)
            continue
        if not new:
            raise SourceError(
                f"patch {p.name} ({p.why}) does not fit {f}: this Caffe tree differs from the 1.0 release "
                "and the last upstream commit. Please report it with the tree's origin."
            )
        f.write_text(new)
        if p.apply(new) is not None:
            raise SourceError(f"patch {p.name}: {f} still lacks the change after patching")
        done.append(p.name)
    return done


# --- command line (for tools/setup.sh) ------------------------------------------------------------
def _shared_col_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-col",
        choices=("0", "1"),
        help="1: with the shared im2col buffer, 0: without (default: $SHARED_COL, else 1)",
    )
    parser.add_argument(
        "--shared-diff",
        choices=("0", "1"),
        help="1: with the shared diff memory, 0: without (default: $SHARED_DIFF, else 1)",
    )


def _shared_col(args: argparse.Namespace) -> bool:
    return shared_col_default() if args.shared_col is None else args.shared_col == "1"


def _shared_diff(args: argparse.Namespace) -> bool:
    return shared_diff_default() if args.shared_diff is None else args.shared_diff == "1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m redseg.toolchain.caffe_source", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("key", help="print a cache-key label for CAFFE_SRC (a folder or a tarball)")
    s.add_argument("src", type=Path)
    s = sub.add_parser("get", help="put CAFFE_SRC's tree (copied or unpacked) at DEST")
    s.add_argument("src", type=Path)
    s.add_argument("dest", type=Path)
    s = sub.add_parser("download", help="download the pinned upstream tree to DEST")
    s.add_argument("dest", type=Path)
    s.add_argument("--url", default=os.environ.get("REDSEG_CAFFE_URL", UPSTREAM_URL))
    s.add_argument("--digest", default=os.environ.get("REDSEG_CAFFE_DIGEST", UPSTREAM_DIGEST))
    s = sub.add_parser("patch", help="apply the project's patch set to the tree at ROOT")
    s.add_argument("root", type=Path)
    _shared_col_option(s)
    s = sub.add_parser("digest", help="print the content digest of a tree")
    s.add_argument("root", type=Path)
    _shared_col_option(sub.add_parser("patchset", help="print the patch set's id"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="setup: %(message)s")
    try:
        if args.cmd == "key":
            if args.src.is_dir():
                check_caffe_tree(args.src)
                print(f"src-{tree_digest(args.src)[:12]}")
            elif args.src.is_file():
                print(f"src-{file_digest(args.src)[:12]}")
            else:
                raise SourceError(f"CAFFE_SRC={args.src}: no such file or folder")
        elif args.cmd == "get":
            if args.dest.exists():
                raise SourceError(f"{args.dest} already exists")
            if args.src.is_dir():
                root = copy_tree(args.src, args.dest)
            else:
                work = args.dest.with_name(args.dest.name + ".unpack")
                shutil.rmtree(work, ignore_errors=True)
                root = unpack(args.src, work)
                root.rename(args.dest)
                shutil.rmtree(work, ignore_errors=True)
                root = args.dest
            print(f"Caffe {check_caffe_tree(root)} source from {args.src}", file=sys.stderr)
        elif args.cmd == "download":
            download(args.url, args.dest, args.digest)
        elif args.cmd == "patch":
            applied = apply_patches(args.root, _shared_col(args), _shared_diff(args))
            print(f"patches applied: {', '.join(applied) or 'none needed'}", file=sys.stderr)
        elif args.cmd == "digest":
            print(tree_digest(args.root))
        elif args.cmd == "patchset":
            print(patchset_id(_shared_col(args), _shared_diff(args)))
    except SourceError as e:
        print(f"setup: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
