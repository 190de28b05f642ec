# Red-Seg in Caffe. `make help` lists the targets.
SHELL := /bin/bash
PY      := .venv/bin/python
# Where things are (override on the command line: make stage1 DATA=data/idrid GPU=0)
IDRID    ?=
DATA     ?= data/idrid
RUN      ?= runs/idrid
SCHEDULE ?= paper
GPU      ?=
VGG16    ?= models/vgg16/VGG_ILSVRC_16_layers.caffemodel
WEIGHTS  ?= $(RUN)/stage2_final.caffemodel
FROM_SCRATCH ?=
ITERS    ?=
LR       ?=
GPU_FLAG := $(if $(GPU),--gpu $(GPU),)
BUDGET   := $(if $(ITERS),--max-iter $(ITERS),) $(if $(LR),--base-lr $(LR),)
TRAIN    := $(PY) tools/train.py --data $(DATA) --run $(RUN) --schedule $(SCHEDULE) $(GPU_FLAG) $(BUDGET)

DEMO     := runs/demo

.PHONY: help setup cuda-check test lint prototxt data crossdata stage1 stage2 evaluate demo reproduce onnx package vgg16 benchmark benchmark-onnx segment-slurm clean

help:
	@echo "make setup      venv + BVLC Caffe with pycaffe (cached build; CAFFE_ROOT=... to use your own)"
	@echo "make test       the whole test suite"
	@echo "make setup CUDA=1 [CUDA_ROOT=...] [CUDA_ARCH_BIN='61 75']   the CUDA build (docs/gpu.md)"
	@echo "make cuda-check compile + link the CUDA build here (no GPU needed), .venv unchanged"
	@echo "make setup SHARED_COL=0   Caffe without the shared im2col buffer: one per conv layer, as upstream (docs/install.md)"
	@echo "make setup SHARED_DIFF=0  Caffe without the shared diff memory (REDSEG_SHARED_DIFF=1 then does nothing; docs/install.md)"
	@echo "make demo       the whole pipeline on a synthetic fundus set -> runs/demo/report.md"
	@echo "make reproduce [IDRID=/path] [SCHEDULE=smoke] [GPUS='0 1'] [RUN=runs/reproduce]  Tables 2, 5, Figs 6, 7 -> reproduction.md"
	@echo "make reproduce LAUNCHER=slurm [SBATCH='--partition=gpu --gres=gpu:1 --time=8:00:00'] [SIGNAL_SECONDS=300]  as SLURM jobs (docs/cluster.md)"
	@echo "make segment-slurm PHOTOS='dir/ ...' [PARTS=4] [WEIGHTS=...|BACKEND=onnx ONNX=...] [SEGMENT_OUT=runs/segment] [SBATCH=...]  screening as a SLURM array + merge"
	@echo "make data IDRID=/path/to/IDRiD   prepare the official IDRiD segmentation set into $(DATA)"
	@echo "make data DATASET=ddr|fgadr|eophtha-ma|diaretdb1|idrid SRC=/path  prepare any set into data/DATASET (docs/datasets.md)"
	@echo "make crossdata [SCHEDULE=demo|smoke] [POOLED=1] [GPUS='0 1'] [LAUNCHER=slurm]  train on each set, score on every set -> crossdata.md"
	@echo "make vgg16      fetch/validate ImageNet VGG16 weights into $(VGG16)"
	@echo "make stage1 stage2 [SCHEDULE=paper|demo|smoke] [GPU=0] [DATA=...] [RUN=...] [ITERS=N] [LR=x]"
	@echo "make evaluate [IDRID=/path]  maps + metrics of $(WEIGHTS) -> $(RUN)/test (full-size labels with IDRID)"
	@echo "make onnx [WEIGHTS=...] [FORCE=1]  export a trained model to ONNX -> $(ONNX) (docs/onnx.md)"
	@echo "make package [RUN=...] [NAME=...] [FORCE=1]  the run's model as a checked package -> models/NAME (docs/model_package.md)"
	@echo "make prototxt   regenerate prototxt/ from redseg/model/net.py"
	@echo "make benchmark  [SIZE=712x1072] [GPU=0] timings -> runs/benchmark/ (docs/performance.md)"
	@echo "make benchmark-onnx [SIZE=712x1072]  one photograph through pycaffe and ONNX Runtime (CPU)"
	@echo "make lint       ruff"

setup:
	@bash tools/setup.sh

# Compile and link the CUDA build with the toolkit at hand (no GPU needed; ~8 min on 2 cores), and
# check that it imports, without switching .venv to it. `make setup CUDA=1` builds and switches.
CUDA_ARCH_BIN ?= 75 90
cuda-check:
	@CUDA=1 LINK_VENV=0 CUDA_ARCH_BIN="$(CUDA_ARCH_BIN)" bash tools/setup.sh

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

prototxt: setup
	$(PY) tools/make_prototxt.py --out prototxt

# make data IDRID=... (the paper's IDRiD preparation into $(DATA)), or any set: make data DATASET=ddr SRC=...
# into data/ddr (tools/prepare_data.py; ALLOW_PARTIAL=1 to go on with a partial download).
DATASET  ?=
SRC      ?=
ALLOW_PARTIAL ?=
data: setup
	@test -n "$(IDRID)$(SRC)" || { echo "usage: make data IDRID=/path/to/IDRiD, or make data DATASET=ddr|fgadr|eophtha-ma|diaretdb1|idrid SRC=/path (docs/datasets.md)"; exit 2; }
	$(if $(SRC),$(PY) tools/prepare_data.py --src "$(SRC)" $(if $(DATASET),--dataset $(DATASET),) $(if $(ALLOW_PARTIAL),--allow-partial,),$(PY) tools/prepare_idrid.py --src "$(IDRID)" --out $(DATA))

vgg16: setup
	$(PY) tools/fetch_vgg16.py --out $(VGG16)

stage1: setup
	$(TRAIN) --stage 1 --weights $(VGG16) $(if $(FROM_SCRATCH),--from-scratch,)

stage2: setup
	$(TRAIN) --stage 2 --weights $(RUN)/stage1_final.caffemodel

evaluate: setup
	$(PY) tools/test_net.py --weights $(WEIGHTS) --data $(DATA) --out $(RUN)/test $(GPU_FLAG) $(if $(IDRID),--gt "$(IDRID)",)

# The whole pipeline on a synthetic fundus set (IDRiD cannot be shipped): the same prepare, train and
# evaluation code as real data, with the short `demo` schedule (redseg/config.py), from scratch.
demo: setup
	$(PY) tools/make_synthetic.py --out $(DEMO)/idrid -q
	$(PY) tools/prepare_idrid.py --src $(DEMO)/idrid --out $(DEMO)/data -q
	$(PY) tools/train.py --stage 1 --data $(DEMO)/data --run $(DEMO) --schedule demo --from-scratch
	$(PY) tools/train.py --stage 2 --data $(DEMO)/data --run $(DEMO) --schedule demo
	$(PY) tools/test_net.py --weights $(DEMO)/stage1_final.caffemodel --data $(DEMO)/data --gt $(DEMO)/idrid --out $(DEMO)/test_stage1 --overlays 0
	$(PY) tools/test_net.py --weights $(DEMO)/stage2_final.caffemodel --data $(DEMO)/data --gt $(DEMO)/idrid --out $(DEMO)/test
	@echo "Demo finished. Report of the two-stage model: $(DEMO)/test/eval/report.md"
	@echo "(metrics.json, pr_curves.png and overlays/ beside it; stage 1 alone, as in Table 2: $(DEMO)/test_stage1/eval/report.md)"
	$(PY) tools/package_model.py --run $(DEMO) --out $(DEMO)/package --eval $(DEMO)/test --name redseg-demo-synthetic --force -q
	@echo "The model as a package, labelled as trained on synthetic data: $(DEMO)/package (docs/model_package.md)"

# Every experiment of the paper (Tables 2 and 5, Figures 6 and 7, the open choices) through the same
# driver and evaluation -> $(REPRO)/reproduction.md (docs/reproduce.md). Without IDRID: the synthetic
# set with the demo schedule; SCHEDULE=smoke: a few minutes; GPUS="0 1 2 3": one experiment per GPU.
GPUS     ?= $(GPU)
REPRO    := $(if $(filter command line environment,$(origin RUN)),$(RUN),runs/reproduce)
REPRO_SCHEDULE := $(if $(filter command line environment,$(origin SCHEDULE)),--schedule $(SCHEDULE),)
# LAUNCHER=slurm: the same experiments as a SLURM job array and a gathering job (docs/cluster.md);
# SBATCH: sbatch options for every job (GATHER_SBATCH: the gathering job's, default SBATCH's);
# SIGNAL_SECONDS: SIGUSR1 that long before the time limit (snapshot, requeue).
LAUNCHER ?=
SBATCH   ?=
GATHER_SBATCH ?=
SIGNAL_SECONDS ?=
REPRO_SLURM := $(if $(LAUNCHER),--launcher $(LAUNCHER),) $(if $(SBATCH),--sbatch="$(SBATCH)",) $(if $(GATHER_SBATCH),--gather-sbatch="$(GATHER_SBATCH)",) $(if $(SIGNAL_SECONDS),--signal-seconds $(SIGNAL_SECONDS),)
reproduce: setup
	$(PY) tools/reproduce.py --run $(REPRO) $(REPRO_SCHEDULE) $(if $(IDRID),--idrid "$(IDRID)" $(if $(FROM_SCRATCH),--from-scratch,--weights $(VGG16)),) $(if $(strip $(GPUS)),--gpus $(GPUS),) $(REPRO_SLURM)

# Train on each prepared set under data/ (IDRiD, DDR, FGADR; POOLED=1: also all together), score every
# model on every set's test split -> $(XDATA)/crossdata.md (docs/datasets.md). Without prepared sets:
# synthetic copies of the five layouts with the demo schedule. Same runner as reproduce (GPUS, LAUNCHER).
XDATA    := $(if $(filter command line environment,$(origin RUN)),$(RUN),runs/crossdata)
POOLED   ?=
DATA_ROOT ?= data
crossdata: setup
	$(PY) tools/crossdata.py --run $(XDATA) --data-root $(DATA_ROOT) $(REPRO_SCHEDULE) $(if $(POOLED),--pooled,) $(if $(FROM_SCRATCH),--from-scratch,) $(if $(strip $(GPUS)),--gpus $(GPUS),) $(REPRO_SLURM)

# Screening many photographs on a SLURM cluster (docs/cluster.md): tools/segment.py as a job array of
# PARTS tasks over PHOTOS, then one summary (tools/segment.py --merge) in SEGMENT_OUT. The model:
# WEIGHTS (pycaffe), or BACKEND=onnx with ONNX (ONNX Runtime). SBATCH, SIGNAL_SECONDS as above.
PHOTOS ?=
PARTS  ?= 4
SEGMENT_OUT ?= runs/segment
segment-slurm: setup
	@test -n "$(PHOTOS)" || { echo "usage: make segment-slurm PHOTOS='photos/ more/' [PARTS=4] [WEIGHTS=...|BACKEND=onnx ONNX=...] [SEGMENT_OUT=...] [SBATCH='...']"; exit 2; }
	$(PY) tools/segment_slurm.py --parts $(PARTS) --out $(SEGMENT_OUT) $(if $(SBATCH),--sbatch="$(SBATCH)",) $(if $(SIGNAL_SECONDS),--signal-seconds $(SIGNAL_SECONDS),) -- $(if $(filter onnx,$(BACKEND)),--onnx $(ONNX),--weights $(WEIGHTS)) $(PHOTOS)

# A trained model as ONNX (docs/onnx.md): checked against pycaffe before it is written; its sidecar's
# mean, FOV diameter and thresholds go into the model's metadata. tools/segment.py --onnx runs it
# without Caffe.
ONNX ?= $(WEIGHTS:.caffemodel=.onnx)
onnx: setup
	$(PY) tools/export_onnx.py --weights $(WEIGHTS) --out $(ONNX) $(if $(FORCE),--force,)

# A trained model as one folder that others can check and use (docs/model_package.md): the weights,
# the deploy net, both ONNX exports, readme.md (Caffe Model Zoo front matter + model card),
# metadata.json, the run's evaluation and SHA256SUMS. tools/segment.py --model takes it.
NAME ?= $(notdir $(RUN))
package: setup
	$(PY) tools/package_model.py --run $(RUN) --out models/$(NAME) $(if $(FORCE),--force,)

# Speed and memory of the training iteration, the Python layers, the deploy pass and scoring
# (docs/performance.md). SIZE=HxW, default the paper's 712x1072.
SIZE ?= 712x1072
benchmark: setup
	$(PY) tools/benchmark.py --size $(SIZE) $(GPU_FLAG) --json runs/benchmark/benchmark_$(SIZE).json

benchmark-onnx: setup
	$(PY) tools/benchmark.py --onnx --size $(SIZE) -q

clean:
	rm -rf $(DEMO) .pytest_cache
