"""Every constant taken from the paper, in one place.

Guo S. et al., "Red lesion segmentation in fundus images based on multi-task learning"
(Red-Seg), Journal of Software (Ruan Jian Xue Bao). Section numbers below refer to that paper;
docs/method.md states the method, the paper's numbers and each open point with our choice. The
net generator, the tools, the tests and the docs all read these values from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- Lesions (paper §2.1; docs/method.md#lesion-branches) ---------------------------------------
LESIONS = ("MA", "HE")  # microaneurysms, haemorrhages: the two branches, in this order
ALL_IDRID_LESIONS = ("MA", "HE", "EX", "SE", "OD")
# The official IDRiD segmentation archive's folder names (docs/data_format.md); every reader and
# writer of that layout (prepare, evaluation, the synthetic generator, the tests) uses these.
IDRID_SEG_DIR = "A. Segmentation"
IDRID_IMAGES_DIR = "1. Original Images"
IDRID_GT_DIR = "2. All Segmentation Groundtruths"
IDRID_SPLIT_DIRS = {"train": "a. Training Set", "test": "b. Testing Set"}
IDRID_LESION_DIRS = {
    "MA": "1. Microaneurysms",
    "HE": "2. Haemorrhages",
    "EX": "3. Hard Exudates",
    "SE": "4. Soft Exudates",
    "OD": "5. Optic Disc",
}

# --- Network (Table 1, Fig. 2; Table 5 for the fusion variants) ---------------------------------
VGG16_CONVS = (
    ("conv1", 64, 2),
    ("conv2", 128, 2),
    ("conv3", 256, 3),
    ("conv4", 512, 3),
    ("conv5", 512, 3),
)
# Side outputs per branch: the last conv of each stage. Stride of stage k is 2**(k-1).
BRANCH_STAGES = {"MA": (2, 3, 4), "HE": (3, 4, 5)}
# Table 5 ablations for the MA branch (stage 1 only in the paper).
MA_FUSION_VARIANTS = {"conv2-4": (2, 3, 4), "conv2-5": (2, 3, 4, 5), "conv1-4": (1, 2, 3, 4)}

# [assumption, docs/method.md#learning-rate-multipliers] lr multipliers of the authors' L-Seg net
# (weight, bias); HED's fuse conv uses 0.001/0.002.
LR_MULT_CONV = (1, 2)
LR_MULT_CONV5 = (100, 200)
LR_MULT_SIDE = (0.01, 0.02)
LR_MULT_FUSE = (1, 2)
FUSE_INIT = 0.2  # constant initial weight of the 1x1 fuse conv (HED and L-Seg; docs/method.md#fillers)


# --- Losses (section 2.2) -----------------------------------------------------------------------
LAMBDA0 = 0.14  # initial fraction of negatives kept by the Top-k balanced loss
LAMBDA_PERIOD = 10_000  # S: lambda steps down every S stage-1 iterations


# --- Training (Algorithm 1, section 3.2) --------------------------------------------------------
@dataclass(frozen=True)
class StageSchedule:
    """One stage's solver settings."""

    base_lr: float
    max_iter: int
    snapshot: int
    display: int = 20
    # Every this many iterations the driver evaluates the train net's losses on the test list
    # (paper Fig. 6: training and test loss over the iterations); 0 = never.
    test_interval: int = 0


@dataclass(frozen=True)
class TrainingSchedule:
    """A training run's schedule: both stages' solver settings, and the period S of the Top-k lambda
    staircase in stage 1 (the staircase itself: redseg/model/topk_schedule.py)."""

    name: str
    stage1: StageSchedule
    stage2: StageSchedule
    lambda_period: int
    description: str


MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005
BATCH_SIZE = 1
EPOCH_IMAGES = 324  # 54 IDRiD training images x 6 augmentations

SCHEDULES = {
    # The paper: 300 epochs of stage 1 at lr 1e-8, then 20 epochs of stage 2 at lr 1e-9.
    "paper": TrainingSchedule(
        "paper",
        StageSchedule(1e-8, 97_200, 10_000, test_interval=3_240),  # test loss every 10 epochs
        StageSchedule(1e-9, 6_480, 3_240, test_interval=648),  # and every 2 epochs of stage 2
        LAMBDA_PERIOD,
        "the paper's schedule (Algorithm 1): 97,200 + 6,480 iterations at lr 1e-8 / 1e-9",
    ),
    # Not the paper's: minutes on a 2-core CPU, for `make demo` on 268x178 synthetic images trained
    # from scratch (no ImageNet weights offline). Stage 1 keeps the paper's shape: S = M / 9.72, so
    # lambda walks the same staircase (0.14 down to 0.0104); lr 1e-7 is the largest that stays
    # finite from scratch at this size (2e-7 gave NaN within 12 iterations). Stage 2 is 1/15 of
    # stage 1, as in the paper, but at 1/2000 of its lr instead of 1/10: after 486 iterations from
    # scratch (49 at lambda 0.14) the background sits at p ~0.3-0.4, where the FN + FP gradient
    # (2p^2(1-p) per background pixel) is ~230x the Top-k one and keeps its direction from image to
    # image; at 1e-8 it erased both maps within 20 iterations. The ratio does not depend on image
    # size (measured: docs/stage2_lr.md).
    "demo": TrainingSchedule(
        "demo",
        StageSchedule(1e-7, 486, 162, display=10, test_interval=54),
        StageSchedule(5e-11, 32, 32, display=10, test_interval=8),
        50,
        "demo schedule: 486 + 32 iterations at lr 1e-7 / 5e-11 from scratch on small images (not the paper's)",
    ),
    # S does not divide M, as in the paper (9.72 periods), so lambda never reaches 0.
    "smoke": TrainingSchedule(
        "smoke",
        StageSchedule(1e-6, 10, 5, display=1, test_interval=5),
        StageSchedule(1e-7, 4, 2, display=1, test_interval=2),
        4,
        "smoke-test schedule: 10 + 4 iterations (lambda steps at 4 and 8)",
    ),
}

# The data sets read as published (docs/datasets.md; their readers: redseg/data/datasets.py).
DATASETS = ("idrid", "ddr", "fgadr", "eophtha-ma", "diaretdb1")

# --- Data (section 3.1) ------------------------------------------------------------------------
IDRID_FULL_SIZE = (4288, 2848)  # (width, height) of the original photographs
DOWNSAMPLE = 4  # images and masks are downsampled 4x to 1072x712
TRAIN_IDS = tuple(range(1, 55))  # IDRiD_01 .. IDRiD_54
TEST_IDS = tuple(range(55, 82))  # IDRiD_55 .. IDRiD_81
# DiaretDB1's official split (published with the data set: 28 training / 61 test images of
# image001..image089): the training images' numbers; the test images are the other 61. Used by the
# DiaretDB1 reader and the synthetic DiaretDB1 layout (redseg/data/synthetic_layouts.py).
DIARETDB1_TRAIN_IDS = (
    1, 3, 4, 9, 10, 11, 13, 14, 20, 22, 24, 25, 26, 27,
    28, 29, 35, 36, 38, 42, 53, 55, 57, 64, 70, 79, 84, 86,
)  # fmt: skip
DIARETDB1_TEST_IDS = tuple(i for i in range(1, 90) if i not in DIARETDB1_TRAIN_IDS)
# [assumption, docs/method.md#augmentations] the 6x augmentation: identity, three rotations, two
# mirrors.
AUGMENTATIONS = ("id", "rot90", "rot180", "rot270", "fliph", "flipv")
# [assumption, docs/method.md#input-mean] the authors' L-Seg mean for IDRiD (B, G, R); used only
# when a prepared set carries no mean of its own.
LSEG_MEAN_BGR = (16.3090, 56.4373, 116.5132)

# --- Evaluation (section 3.3; the authors' released IDRiD protocol) ------------------------------
PROTOCOL_THRESHOLDS = 31  # t = i/30, i = 0..30
PAPER_RESULTS = {
    # Table 2
    "Red-Seg stage 1 only (Table 2)": {
        "MA": {"precision": 0.4875, "recall": 0.4926, "auc_pr": 0.4669},
        "HE": {"precision": 0.5987, "recall": 0.5955, "auc_pr": 0.5916},
    },
    "Red-Seg two-stage (Table 2)": {
        "MA": {"precision": 0.5009, "recall": 0.4993, "auc_pr": 0.4839},
        "HE": {"precision": 0.6269, "recall": 0.6251, "auc_pr": 0.5695},
    },
}
# Table 2's middle row: the paper reports no numbers for training with the stage-2 loss only.
# Table 5: the MA branch's fusion variants, stage 1 only (MA precision, recall, AUC_PR).
PAPER_TABLE5 = {
    "conv2-4": {"precision": 0.4875, "recall": 0.4926, "auc_pr": 0.4669},
    "conv2-5": {"precision": 0.4852, "recall": 0.4879, "auc_pr": 0.4477},
    "conv1-4": {"precision": 0.4864, "recall": 0.4897, "auc_pr": 0.4647},
}
# Tables 3/4: AUC_PR of other methods on IDRiD (None: not reported).
PAPER_COMPARISON_AUC_PR = {
    "HED": (0.4271, 0.5084),
    "FCRN": (0.3383, 0.4200),
    "DeepLabv3+": (0.1514, 0.4772),
    "L-Seg": (0.4627, 0.6374),
    "Clement et al.": (None, 0.5300),
    "LWENet": (0.3443, 0.3769),
    "IDRiD 1st VRT": (0.4951, 0.6804),
    "IDRiD 2nd PATech": (0.4740, 0.6490),
    "IDRiD 3rd iFLYTEK-MIG": (0.5017, 0.5588),
    "IDRiD 4th SOONER": (0.4003, 0.5395),
    "Red-Seg (paper)": (0.4839, 0.5695),
}

# --- Segmenting new photographs (tools/segment.py, docs/segment.md) ------------------------------
# [measured] The field-of-view (FOV) diameter of IDRiD photographs at a quarter of full size
# (1072x712), in pixels: the one scale of every prepared set (tools/prepare_data.py rescales each
# photograph of DDR, FGADR, e-ophtha, DiaretDB1 so that its FOV is this wide) and what
# tools/segment.py rescales a photograph's FOV to when neither the model (its sidecar / ONNX
# metadata) nor --data says otherwise. The median over the 27 IDRiD test photographs at 1072x712
# that the Red-Seg authors released with their later code (SEBNet): 853 px (852.5 to 950.3), as
# measured by redseg.data.fov and by an independent detector (retinalysis-fundusprep) within 0.08 %
# of each other. (The project's earlier value, 888.1 px, was derived from the synthetic generator
# and is 4 % too large.) A prepared IDRiD set measures its own value into meta.json, which wins.
IDRID_QUARTER_FOV_DIAMETER_PX = 853.0
# Smallest connected component of a thresholded map counted as a lesion, in pixels at the
# network's (training) scale: drops single-pixel specks; every labelled lesion of a prepared set is
# larger (the 'any' mask rule; the smallest synthetic MA component at 268x178 is 9 px).
MIN_COMPONENT_PX = 2
