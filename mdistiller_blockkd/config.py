"""The configuration tree (yacs), compatible with mdistiller's YAML files.

Every node, key and default of mdistiller's ``CFG`` for NONE / KD / DKD / REVIEWKD is
here with the same name, so an mdistiller YAML loads unchanged. Additions (all with
defaults that keep upstream behaviour) are marked ``# added``. Block-KD's node is
``CFG.BLOCKKD``; its options are documented in ``docs/blockkd.md``.

Use :func:`load_cfg` to build a config from a YAML file plus ``KEY VALUE`` overrides;
an unknown key raises :class:`~mdistiller_blockkd.errors.ConfigError` naming it.

The shipped YAMLs (the repository's ``configs/``, installed inside the wheel as
``mdistiller_blockkd/configs/``) are found by a short name: ``cifar100/blockkd/res56_res20``
(also ``configs/cifar100/blockkd/res56_res20.yaml``) names the same file as the path in
a checkout; see :func:`resolve_config` and :func:`list_configs`.
"""

from __future__ import annotations

import math
import os
import re

from yacs.config import CfgNode as CN

from .errors import ConfigError

CFG = CN()

# Experiment
CFG.EXPERIMENT = CN()
CFG.EXPERIMENT.PROJECT = "distill"
CFG.EXPERIMENT.NAME = ""
CFG.EXPERIMENT.TAG = "default"
CFG.EXPERIMENT.SEED = 0  # added
CFG.EXPERIMENT.DETERMINISTIC = False  # added: deterministic kernels (utils.misc.set_deterministic), for bit-exact resume on CUDA

# Dataset
CFG.DATASET = CN()
CFG.DATASET.TYPE = "cifar100"  # cifar100 | fashion_mnist | imagenet | synthetic | coco (detection) | glue | tsv
CFG.DATASET.NUM_WORKERS = 2
CFG.DATASET.TEST = CN()
CFG.DATASET.TEST.BATCH_SIZE = 64
CFG.DATASET.ROOT = ""  # added: "" = the type's default location (see data/)
CFG.DATASET.DOWNLOAD = True  # added: try to download CIFAR-100 when missing
CFG.DATASET.TRAIN_SUBSET = 0  # added: >0 keeps that many training images (fixed, seeded choice)
CFG.DATASET.TEST_SUBSET = 0  # added: >0 keeps that many test images
# added: >0 holds out that many training images (fixed, class-balanced, seeded choice, test
# transform) as a validation split, scored every epoch beside the test set; choose options on it
CFG.DATASET.VAL_SPLIT = 0
CFG.DATASET.IMAGE_SIZE = 224  # added: ImageNet crop size
CFG.DATASET.SYNTHETIC = CN()  # added: the generated set for tests and smoke runs
CFG.DATASET.SYNTHETIC.NUM_CLASSES = 10
CFG.DATASET.SYNTHETIC.TRAIN_SIZE = 512
CFG.DATASET.SYNTHETIC.TEST_SIZE = 256
CFG.DATASET.SYNTHETIC.IMAGE_SIZE = 32

# Distiller
CFG.DISTILLER = CN()
CFG.DISTILLER.TYPE = "NONE"  # vanilla as default
CFG.DISTILLER.TEACHER = "ResNet50"
CFG.DISTILLER.STUDENT = "resnet32"
CFG.DISTILLER.TEACHER_CKPT = ""  # added: "" = mdistiller's default path for the teacher name
CFG.DISTILLER.TEACHER_PRETRAINED = False  # added: timm teachers: load timm's pretrained weights
CFG.DISTILLER.FOLD_TEACHER_BN = True  # added: compute teacher outputs with BN folded into convs (exact, verified)

# Solver
CFG.SOLVER = CN()
CFG.SOLVER.TRAINER = "base"
CFG.SOLVER.BATCH_SIZE = 64
CFG.SOLVER.EPOCHS = 240
CFG.SOLVER.LR = 0.05
CFG.SOLVER.LR_DECAY_STAGES = [150, 180, 210]
CFG.SOLVER.LR_DECAY_RATE = 0.1
CFG.SOLVER.WEIGHT_DECAY = 0.0001
CFG.SOLVER.MOMENTUM = 0.9
CFG.SOLVER.TYPE = "SGD"  # SGD | AdamW (added; engine/optim.py)
CFG.SOLVER.AMP = "off"  # added: off | bf16 | fp16 (fp16 uses a grad scaler) | auto (bf16 where native, else off)
CFG.SOLVER.CHANNELS_LAST = False  # added

# Log
CFG.LOG = CN()
CFG.LOG.TENSORBOARD_FREQ = 500
CFG.LOG.SAVE_CHECKPOINT_FREQ = 40
# added: write the mid-epoch checkpoint 'latest_step' (the exact position) every N steps; 0 = off
CFG.LOG.SAVE_EVERY_STEPS = 0
CFG.LOG.PREFIX = "./output"
# upstream default True; off here. True logs to Weights & Biases (the [wandb] extra; utils/wandb_log.py)
CFG.LOG.WANDB = False
CFG.LOG.WANDB_PROJECT = ""  # added: "" = EXPERIMENT.PROJECT (as mdistiller)
CFG.LOG.WANDB_ENTITY = ""  # added: "" = wandb's default entity (WANDB_ENTITY, else your account)
CFG.LOG.WANDB_MODE = ""  # added: online | offline; "" = wandb's default (WANDB_MODE, else online)
# added: progress of every loop; a terminal shows tqdm bars, a log file (not a terminal) one plain
# line every PROGRESS_EVERY_S seconds and/or every PROGRESS_EVERY_PCT percent of the loop (0 = off)
CFG.LOG.PROGRESS = True
CFG.LOG.PROGRESS_EVERY_S = 30.0
CFG.LOG.PROGRESS_EVERY_PCT = 0
# added: score the distiller's extra heads (eval_logits: Block-KD's stones and teacher) every N
# epochs and at the last epoch; 0 = never. They cost teacher passes over the whole test set.
CFG.LOG.EVAL_HEADS_FREQ = 1

# Distillation methods
# KD
CFG.KD = CN()
CFG.KD.TEMPERATURE = 4
CFG.KD.LOSS = CN()
CFG.KD.LOSS.CE_WEIGHT = 0.1
CFG.KD.LOSS.KD_WEIGHT = 0.9

# DKD (Decoupled Knowledge Distillation, CVPR 2022)
CFG.DKD = CN()
CFG.DKD.CE_WEIGHT = 1.0
CFG.DKD.ALPHA = 1.0
CFG.DKD.BETA = 8.0
CFG.DKD.T = 4.0
CFG.DKD.WARMUP = 20

# ReviewKD (Distilling Knowledge via Knowledge Review, CVPR 2021)
CFG.REVIEWKD = CN()
CFG.REVIEWKD.CE_WEIGHT = 1.0
CFG.REVIEWKD.REVIEWKD_WEIGHT = 1.0
CFG.REVIEWKD.WARMUP_EPOCHS = 20
CFG.REVIEWKD.SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.OUT_SHAPES = [1, 8, 16, 32]
CFG.REVIEWKD.IN_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.OUT_CHANNELS = [64, 128, 256, 256]
CFG.REVIEWKD.MAX_MID_CHANNEL = 512
CFG.REVIEWKD.STU_PREACT = False

# LSKD (logit-standardised KD, Sun et al., CVPR 2024): KD on z-scored logits
CFG.LSKD = CN()
CFG.LSKD.T = 2.0
CFG.LSKD.CE_WEIGHT = 0.1
CFG.LSKD.KD_WEIGHT = 9.0

# Block-KD (block-wise logit distillation); see docs/blockkd.md
CFG.BLOCKKD = CN()
CFG.BLOCKKD.ALPHA = 1.0  # task (CE) terms
CFG.BLOCKKD.BETA = 1.0  # distill terms d(., teacher)
CFG.BLOCKKD.GAMMA = 1.0  # cross terms d(., stone ensemble)
CFG.BLOCKKD.T = 4.0
CFG.BLOCKKD.WARMUP = 20  # epochs of linear warm-up of the distill and cross terms; 0 = none
# False: gradient flows into the stones' ensemble Y^E through the cross terms. Chosen on the
# 600-step study's validation split, where it beat True on both pairs (docs/blockkd.md#ablations)
CFG.BLOCKKD.DETACH_ENSEMBLE = False
CFG.BLOCKKD.WEIGHT_CROSS = True
# CNN pairs: conv1x1_bn | conv3x3_bn | conv1x1_bn_relu | conv3x3_bn_relu; transformer pairs: linear | linear_ln
CFG.BLOCKKD.CONNECTOR = "conv1x1_bn"
CFG.BLOCKKD.PAIRS = []  # [] = pair by output stride; else [[student_block, teacher_block], ...] (1-based)
CFG.BLOCKKD.LOGIT_LOSS = "kd"  # kd | dkd | lskd (logit-standardised KD)
CFG.BLOCKKD.DKD_ALPHA = 1.0  # used when LOGIT_LOSS = dkd
CFG.BLOCKKD.DKD_BETA = 8.0
CFG.BLOCKKD.STONES = "all"  # all | last:K | sample:K | every:K
# The measured cheap option is last:2 (~1.25x KD, within noise of all); sample:K and every:K
# lose accuracy in the 600-step study and are kept for experiments only (docs/blockkd.md).
# added: factor on the stones' terms under sample:K / every:K: unbiased (n/K resp. K, the
# expected loss equals all's) | none (1: the stones weigh what they weigh under all, when they run)
CFG.BLOCKKD.STONE_SCALE = "unbiased"
# added: sample:K / every:K: every stone on every step during the first N epochs (epoch <= N),
# the cheap schedule after (the single-stone estimate is noisiest while the connectors are new)
CFG.BLOCKKD.DENSE_EPOCHS = 0
CFG.BLOCKKD.STONE_WEIGHTS = "halving"  # halving: w_i = 1/2^(n-i) (the paper) | uniform: w_i = 1
CFG.BLOCKKD.BATCH_STONES = "auto"  # on | off | auto (on for CUDA inputs): stones share teacher blocks as one concatenated batch
# True: the stones' passes through the teacher keep only their inputs for backward and run again
# there (torch.utils.checkpoint): less memory, one more forward of the stones per step; same loss and
# gradients (SAVE_MASKS then has nothing left to do)
CFG.BLOCKKD.RECOMPUTE = False
# True: where the stones' backward needs an activation only through its sign (a ReLU) or not at all (the input of a
# frozen convolution, linear layer or pooling), it keeps a bit mask instead; same loss and gradients.
# Off by default: on this project's CPU it cut Block-KD all's peak memory to 1.02x KD but made a step
# 19% (fp32) to 35% (bf16) slower (docs/blockkd.md, "Memory"); turn it on when memory limits the batch
CFG.BLOCKKD.SAVE_MASKS = False


# ---- Detection (DATASET.TYPE coco; see docs/detection.md and mdistiller_blockkd/detection/) ----
# Models are DISTILLER.TEACHER / STUDENT = fasterrcnn_<resnet>_fpn (torchvision Faster R-CNN).
CFG.DETECTION = CN()
CFG.DETECTION.TRAIN_SET = "train2017"  # <DATASET.ROOT>/<split>/ and annotations/instances_<split>.json
CFG.DETECTION.TEST_SET = "val2017"
CFG.DETECTION.CATEGORY_IDS_AS_LABELS = False  # True: label = COCO category id (torchvision's 91-slot heads)
CFG.DETECTION.BOX_OUTSIDE = "clip"  # clip (and warn) | error: boxes reaching outside their image
CFG.DETECTION.MIN_SIZE = 800  # GeneralizedRCNNTransform resize (torchvision defaults)
CFG.DETECTION.MAX_SIZE = 1333
CFG.DETECTION.IMAGE_MEAN = [0.485, 0.456, 0.406]
CFG.DETECTION.IMAGE_STD = [0.229, 0.224, 0.225]
CFG.DETECTION.STUDENT_NORM = "bn"  # bn | frozen_bn (the teacher always uses frozen_bn)
CFG.DETECTION.TRAINABLE_LAYERS = 5  # student backbone stages trained (5 = all, as from scratch)
CFG.DETECTION.STUDENT_BACKBONE_CKPT = ""  # optional ImageNet weights of the student's ResNet (local file)
CFG.DETECTION.FPN_CHANNELS = 256  # FPN width (torchvision: 256)
CFG.DETECTION.REPRESENTATION_SIZE = 1024  # TwoMLPHead width
CFG.DETECTION.RPN_PRE_NMS_TOP_N_TRAIN = 2000
CFG.DETECTION.RPN_PRE_NMS_TOP_N_TEST = 1000
CFG.DETECTION.RPN_POST_NMS_TOP_N_TRAIN = 2000
CFG.DETECTION.RPN_POST_NMS_TOP_N_TEST = 1000
CFG.DETECTION.RPN_BATCH_SIZE_PER_IMAGE = 256
CFG.DETECTION.BOX_BATCH_SIZE_PER_IMAGE = 512
CFG.DETECTION.DETECTIONS_PER_IMAGE = 100
CFG.DETECTION.BOX_SCORE_THRESH = 0.05
CFG.DETECTION.DISTILL_WARMUP_STEPS = 0  # >0: warm-ups of DKD / BLOCKKD count steps, not epochs (mdistiller's detection DKD: 1000)
# ---- end of detection block ----

# ---- Text, transformers and the fine-tuning recipe (docs/nlp.md) ----
# Models: DISTILLER.TEACHER / STUDENT = hf:<folder>[,options] (Hugging Face BERT-family encoders) or
# timm:<vit or deit name>[,img_size=..,patch_size=..,blocks=..]; see models/hf_encoder.py and models/timm_vit.py.
CFG.DATASET.GLUE = CN()
CFG.DATASET.GLUE.TASK = "sst2"  # DATASET.TYPE glue: cola | sst2 | mrpc | qqp | mnli | mnli-mm | qnli | rte | wnli
CFG.DATASET.TEXT = CN()
CFG.DATASET.TEXT.MAX_LENGTH = 128  # glue / tsv: tokens per example at most; batches are padded to their longest
# step: mdistiller's per-epoch LR_DECAY_STAGES / LR_DECAY_RATE | linear: warm-up then linear decay to 0 (BERT
# fine-tuning) | cosine: warm-up then cosine decay to 0 (ViTs); linear and cosine are set every step
CFG.SOLVER.SCHEDULER = "step"
CFG.SOLVER.WARMUP_EPOCHS = 0.0  # linear / cosine: epochs (fractions allowed) of linear warm-up from lr 0
CFG.SOLVER.CLIP_GRAD_NORM = 0.0  # > 0: clip the gradients' global L2 norm to this before each update (BERT: 1.0)
# ---- end of text block ----

def _check_text_and_recipe(cfg):
    """The keys of the text block: schedule, warm-up, clipping, text length (one error per bad value)."""
    s = cfg.SOLVER
    sched = str(s.SCHEDULER).strip().lower()
    if sched not in ("step", "linear", "cosine"):
        raise ConfigError(f"SOLVER.SCHEDULER is '{s.SCHEDULER}'; use step (mdistiller's LR_DECAY_STAGES), linear "
                          "(warm-up then linear decay, BERT) or cosine (warm-up then cosine decay)")
    warm = float(s.WARMUP_EPOCHS)
    if not warm >= 0:
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS is {s.WARMUP_EPOCHS}; use 0 (no warm-up) or a positive number of epochs")
    if warm and sched == "step":
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS is {s.WARMUP_EPOCHS} but SOLVER.SCHEDULER is step, which has no "
                          "warm-up; use SOLVER.SCHEDULER linear or cosine, or WARMUP_EPOCHS 0")
    if warm >= float(s.EPOCHS):
        raise ConfigError(f"SOLVER.WARMUP_EPOCHS is {s.WARMUP_EPOCHS} but SOLVER.EPOCHS is {s.EPOCHS}; the warm-up "
                          "must end before the last epoch")
    if not float(s.CLIP_GRAD_NORM) >= 0:
        raise ConfigError(f"SOLVER.CLIP_GRAD_NORM is {s.CLIP_GRAD_NORM}; use 0 (no clipping) or a positive norm (1.0)")
    length = cfg.DATASET.TEXT.MAX_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or length < 8:
        raise ConfigError(f"DATASET.TEXT.MAX_LENGTH is {length!r}; use an integer >= 8 (GLUE: 128)")

# -- validation ------------------------------------------------------------------------
#: Ranges of numeric options, checked by :func:`load_cfg` for every command: ``key: (low,
#: high, what)``; a number is an inclusive bound, ``">0"`` / ``"<1"`` a strict one, None
#: no bound; a list's every item is checked; keys under one rule are listed together.
#: Options that one component reads (``DATASET.SYNTHETIC.*``, the model names...) are
#: checked there.
_RANGES = {
    "SOLVER.EPOCHS": (1, None, "a number of epochs"),
    "SOLVER.BATCH_SIZE": (1, None, "images per step and process"),
    "SOLVER.LR": (0, None, "a learning rate; mdistiller uses 0.05"),
    "SOLVER.LR_DECAY_STAGES": (0, None, "epochs after which the learning rate decays, e.g. [150, 180, 210]"),
    "SOLVER.LR_DECAY_RATE": (0, None, "the factor of each decay; mdistiller uses 0.1"),
    "SOLVER.WEIGHT_DECAY": (0, None, "an L2 factor; mdistiller uses 5e-4"),
    "SOLVER.MOMENTUM": (0, "<1", "SGD momentum; mdistiller uses 0.9"),
    "DATASET.NUM_WORKERS": (0, None, "0 loads in the main process"),
    "DATASET.TEST.BATCH_SIZE": (1, None, "images per evaluation batch"),
    **dict.fromkeys(("DATASET.TRAIN_SUBSET", "DATASET.TEST_SUBSET"), (0, None, "0 = the whole set")),
    "DATASET.VAL_SPLIT": (0, None, "0 = no validation split"),
    "DATASET.IMAGE_SIZE": (1, None, "a crop size such as 224"),
    **dict.fromkeys(("LOG.TENSORBOARD_FREQ", "LOG.SAVE_CHECKPOINT_FREQ", "LOG.EVAL_HEADS_FREQ"),
                    (0, None, "0 = never")),
    "LOG.SAVE_EVERY_STEPS": (0, None, "0 = off"),
    "LOG.PROGRESS_EVERY_S": (0, None, "seconds between progress lines in a log file; 0 = no timed lines"),
    "LOG.PROGRESS_EVERY_PCT": (0, 100, "percent of a loop between progress lines in a log file; 0 = none"),
    "KD.TEMPERATURE": (">0", None, "a temperature; mdistiller uses 4"),
    "DKD.T": (">0", None, "a temperature; mdistiller uses 4.0"),
    "LSKD.T": (">0", None, "a temperature; the default is 2.0"),
    "BLOCKKD.T": (">0", None, "a temperature: 4 on CIFAR-style data, 1 on ImageNet"),
    **dict.fromkeys(("DKD.WARMUP", "REVIEWKD.WARMUP_EPOCHS", "BLOCKKD.WARMUP"), (0, None, "0 = no warm-up")),
    "BLOCKKD.DENSE_EPOCHS": (0, None, "0 = the STONES schedule from the start"),
    "DETECTION.DISTILL_WARMUP_STEPS": (0, None, "0 = warm-ups count epochs"),
    **dict.fromkeys(("REVIEWKD.SHAPES", "REVIEWKD.OUT_SHAPES"), (1, None, "feature sizes in pixels")),
    **dict.fromkeys(("REVIEWKD.IN_CHANNELS", "REVIEWKD.OUT_CHANNELS"), (1, None, "channel counts")),
    "REVIEWKD.MAX_MID_CHANNEL": (1, None, "a channel count"),
    "DETECTION.MIN_SIZE": (1, None, "a size in pixels; torchvision uses 800"),
    "DETECTION.MAX_SIZE": (1, None, "a size in pixels; torchvision uses 1333"),
    "DETECTION.IMAGE_STD": (">0", None, "per-channel standard deviations"),
    "DETECTION.FPN_CHANNELS": (1, None, "a channel count; torchvision uses 256"),
    "DETECTION.REPRESENTATION_SIZE": (1, None, "a width; torchvision uses 1024"),
    **dict.fromkeys(("DETECTION.RPN_PRE_NMS_TOP_N_TRAIN", "DETECTION.RPN_PRE_NMS_TOP_N_TEST",
                     "DETECTION.RPN_POST_NMS_TOP_N_TRAIN", "DETECTION.RPN_POST_NMS_TOP_N_TEST"),
                    (1, None, "a number of proposals")),
    "DETECTION.RPN_BATCH_SIZE_PER_IMAGE": (1, None, "a number of anchors"),
    "DETECTION.BOX_BATCH_SIZE_PER_IMAGE": (1, None, "a number of proposals"),
    "DETECTION.DETECTIONS_PER_IMAGE": (1, None, "a number of boxes"),
    "DETECTION.BOX_SCORE_THRESH": (0, 1, "a score threshold"),
}
#: Loss weights: each must be >= 0.
_WEIGHTS = ("KD.LOSS.CE_WEIGHT", "KD.LOSS.KD_WEIGHT", "DKD.CE_WEIGHT", "DKD.ALPHA", "DKD.BETA", "REVIEWKD.CE_WEIGHT",
            "REVIEWKD.REVIEWKD_WEIGHT", "LSKD.CE_WEIGHT", "LSKD.KD_WEIGHT", "BLOCKKD.ALPHA", "BLOCKKD.BETA",
            "BLOCKKD.GAMMA", "BLOCKKD.DKD_ALPHA", "BLOCKKD.DKD_BETA")
#: Integers beyond this overflow torch and numpy (64-bit).
_INT_LIMIT = 2 ** 63 - 1

_TYPE_WORDS = {bool: "True or False", int: "a whole number", float: "a number with a decimal point",
               str: "a text value", list: "a list", tuple: "a list"}


def _describe_type(default) -> str:
    if isinstance(default, CN):
        return "a section of settings (KEY: value lines under it)"
    words = _TYPE_WORDS.get(type(default), type(default).__name__)
    return f"{words} such as {default!r}" if not isinstance(default, (list, tuple)) or default else words


def _type_hint(given, default) -> str:
    if isinstance(default, float) and isinstance(given, int) and not isinstance(given, bool):
        return f"; write {given}.0"
    if isinstance(default, (int, float)) and isinstance(given, str) and given.strip().lower() in (
            "nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return "; give a finite number"
    if isinstance(default, (list, tuple)) and isinstance(given, str):
        return "; write the list with quotes around text items, e.g. ['a', 'b'], or numbers, e.g. [1, 2]"
    return ""


def _lookup(node, key: str, missing=None):
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _items(node, prefix=""):
    """``(dotted key, key, value)`` of every entry of a nested mapping, depth first."""
    for k, v in node.items():
        dotted = f"{prefix}{k}"
        yield dotted, k, v
        if isinstance(v, dict):
            yield from _items(v, dotted + ".")


def _number_problem(key: str, value):
    """Why the number ``value`` (in ``key``, maybe inside a list) cannot be used, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > _INT_LIMIT:
        return f"{key} holds {value}, too large (the limit is {_INT_LIMIT}); give a smaller number"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} holds {value}; give a finite number"
    return None


def _check_values(cfg, base) -> None:
    """Every leaf against its default in ``base``: set (not null), list items of the default's
    type, numbers that fit 64 bits and are finite. (``BLOCKKD.PAIRS``, empty by default, is
    checked by Block-KD's own option check.)"""
    for key, _, value in _items(cfg):
        if isinstance(value, dict):
            continue
        default = _lookup(base, key)
        if value is None and default is not None:
            raise ConfigError(f"{key} is empty (null); give {_describe_type(default)}")
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            problem = _number_problem(key, item)
            if problem:
                raise ConfigError(problem)
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)) and default:
            want = type(default[0])
            for item in value:
                ok = (isinstance(item, (int, float)) and not isinstance(item, bool)) if want is float else (
                    type(item) is want)
                if not ok:
                    words = "a number" if want is float else _TYPE_WORDS[want]
                    raise ConfigError(f"{key} is {list(value)!r}: the item {item!r} is not {words}; "
                                      f"give a list like the default {list(default)!r}")


def _check_ranges(cfg) -> None:
    checks = dict(_RANGES, **{k: (0, None, "a loss weight") for k in _WEIGHTS})
    for key, (low, high, what) in checks.items():
        value = _lookup(cfg, key)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            bounds = []
            for bound, op in ((low, ">="), (high, "<=")):
                if bound is None:
                    continue
                if isinstance(bound, str):
                    op, bound = bound[0], float(bound[1:])
                ok = {">=": v >= bound, ">": v > bound, "<=": v <= bound, "<": v < bound}[op]
                bounds.append((ok, f"{op} {bound:g}"))
            if not all(ok for ok, _ in bounds):
                shown = f"{key} is {value!r}" if v is value else f"{key} is {list(value)!r} (item {v!r})"
                raise ConfigError(f"{shown}; it must be {' and '.join(b for _, b in bounds)} ({what})")


def _check_wandb(cfg) -> None:
    log = cfg.LOG
    mode = str(log.WANDB_MODE).strip().lower()
    if mode not in ("", "online", "offline"):
        raise ConfigError(f"LOG.WANDB_MODE is '{log.WANDB_MODE}'; use online, offline, or '' (wandb's default: "
                          "WANDB_MODE, else online); to log nothing set LOG.WANDB False")
    for key in ("WANDB_PROJECT", "WANDB_ENTITY"):
        value = str(log[key])
        bad = sorted(set(value) & set("/\\#?%:") | ({" "} if value != value.strip() else set()))
        if bad or len(value) > 128:
            why = f"it contains {' '.join(repr(c) for c in bad)}" if bad else "it is longer than 128 characters"
            raise ConfigError(f"LOG.{key} is '{value}'; {why}, which wandb does not accept in a name: give a "
                              "plain name such as 'blockkd-cifar100' (or '' for the default)")


def _check(cfg, base) -> None:
    """Validate a merged config (see :func:`load_cfg`); raise :class:`ConfigError` naming the first bad key."""
    _check_values(cfg, base)
    from .utils.precision import AMP_CHOICES

    if str(cfg.SOLVER.AMP).strip().lower() not in AMP_CHOICES:
        raise ConfigError(f"SOLVER.AMP is '{cfg.SOLVER.AMP}'; use one of {', '.join(AMP_CHOICES)}")
    if str(cfg.SOLVER.TYPE).strip().upper() not in ("SGD", "ADAMW"):
        raise ConfigError(f"SOLVER.TYPE is '{cfg.SOLVER.TYPE}'; use SGD (mdistiller's) or AdamW")
    _check_ranges(cfg)
    _check_wandb(cfg)
    _check_text_and_recipe(cfg)
    for key in ("PROJECT", "NAME", "TAG"):  # the run folder is LOG.PREFIX/<PROJECT>/<NAME or TAG>
        value = str(cfg.EXPERIMENT[key])
        parts = value.replace("\\", "/").split("/")
        if os.path.isabs(value) or value.startswith(("/", "\\")) or ".." in parts:
            raise ConfigError(
                f"EXPERIMENT.{key} is '{value}'; it names a folder inside LOG.PREFIX, so it may not be an absolute "
                "path or contain '..': give a plain name such as 'kd_res56_res20' (set LOG.PREFIX to write elsewhere)"
            )


def _read_yaml(path: str) -> dict:
    """The mapping a config YAML holds; :class:`ConfigError` for a file that is not one."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; give a YAML config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{path}: not valid YAML ({what}{at}); fix the syntax there") from None
    if data is None:
        raise ConfigError(f"{path} holds no settings (it is empty or only comments); give a config YAML such as "
                          "configs/cifar100/kd/res56_res20.yaml")
    if not isinstance(data, dict):
        shown = " ".join(repr(data).split())[:60]
        raise ConfigError(f"{path}: the top level is a {type(data).__name__} ({shown}), not a mapping of settings; "
                          "write sections of KEY: value lines, e.g. 'SOLVER:' then '  LR: 0.05'")
    bad = next((k for _, k, _ in _items(data) if not isinstance(k, str)), None)
    if bad is not None:
        raise ConfigError(f"{path}: the key {bad!r} is not a name; keys are names such as SOLVER or LR")
    return data


def _merge_into(base: dict, over: dict) -> dict:
    """``over`` merged onto ``base`` (nested mappings merge key by key; any other value replaces)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge_into(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_with_bases(path: str, seen=()) -> dict:
    """A config YAML with its ``_BASE_`` chain resolved: ``_BASE_: other.yaml`` (relative to the file's
    folder) is read first and this file's keys are merged onto it, as in detectron2 and mmcv configs."""
    data = _read_yaml(path)
    base_name = data.pop("_BASE_", None)
    if base_name is None:
        return data
    if not isinstance(base_name, str) or not base_name.strip():
        raise ConfigError(f"{path}: _BASE_ is {base_name!r}; give the path of the base YAML, relative to this file")
    base_path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), base_name))
    if base_path in seen or base_path == os.path.abspath(path):
        raise ConfigError(f"{path}: _BASE_ '{base_name}' leads back to a file already read ({base_path}); "
                          "remove the cycle")
    if not os.path.isfile(base_path):
        raise ConfigError(f"{path}: _BASE_ '{base_name}' not found (looked for {base_path}); give the base YAML's "
                          "path relative to this file")
    return _merge_into(_read_with_bases(base_path, tuple(seen) + (os.path.abspath(path),)), data)


def _mismatch(where: str, e: ValueError, cfg, base, given_of) -> ConfigError:
    """A yacs type mismatch as one line naming the key, the value given and the type it takes."""
    found = re.search(r"for config key: (\S+)\s*$", str(e))
    if not found:
        return ConfigError(f"{where}: {' '.join(str(e).split())[:300]}")
    key = found.group(1)
    default, given = _lookup(base, key, _lookup(cfg, key)), given_of(key)
    shown = "empty (null)" if given is None else " ".join(repr(given).split())[:80]
    return ConfigError(f"{where}: {key} is {shown}, but it takes {_describe_type(default)}{_type_hint(given, default)}")


def load_cfg(path: str | None = None, opts=None, base: CN | None = None) -> CN:
    """Return a frozen copy of ``CFG`` merged with the YAML at ``path`` and ``opts``.

    ``path`` is a file or the short name of a shipped config (see :func:`resolve_config`). A
    file may start from another with ``_BASE_: other.yaml`` (relative to its folder; chains
    allowed): the base is read first and the file's keys are merged onto it.

    ``opts`` is the trailing ``KEY VALUE ...`` list of the command line.

    Everything a user can get wrong raises one :class:`ConfigError` line naming the key or
    the file: a YAML that does not parse or is not a mapping, an unknown key, a value of
    the wrong type (also inside lists), null, an integer too large for 64 bits, a
    non-finite number, or a number out of its range (:data:`_RANGES`: negative learning
    rates, zero epochs, ...).
    """
    base = base or CFG
    cfg = base.clone()
    if path:
        path = resolve_config(path)
        data = _read_with_bases(path)
        try:
            cfg.merge_from_other_cfg(CN(data))
        except KeyError as e:
            raise ConfigError(f"{path}: {e.args[0]}; check the key's spelling against mdistiller_blockkd/config.py") from None
        except ValueError as e:
            raise _mismatch(path, e, cfg, base, lambda key: _lookup(data, key)) from None
        except (TypeError, AssertionError) as e:
            raise ConfigError(f"{path}: {e}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(opts)}")
        opts = list(opts)
        for key, value in zip(opts[0::2], opts[1::2]):  # one at a time: an error names its own pair
            try:
                cfg.merge_from_list([key, value])
            except KeyError as e:
                raise ConfigError(f"override: {e.args[0]}; check the key's spelling against mdistiller_blockkd/config.py") from None
            except ValueError as e:
                raise _mismatch("override", e, cfg, base, lambda _key: CN._decode_cfg_value(value)) from None
            except (TypeError, AssertionError) as e:
                raise ConfigError(f"override: {e}") from None
    _check(cfg, base)
    cfg.freeze()
    return cfg


def log_msg(msg: str, mode: str = "INFO") -> str:
    """``[MODE] msg``, coloured like mdistiller on a terminal; plain in a log file or with ``NO_COLOR`` set
    (:func:`~mdistiller_blockkd.utils.console.colour_on`)."""
    from .utils.console import colour_on

    if not colour_on():
        return f"[{mode}] {msg}"
    colors = {"INFO": 36, "TRAIN": 32, "EVAL": 31}
    return f"\033[{colors.get(mode, 0)}m[{mode}] {msg}\033[0m"


# -- shipped configs ------------------------------------------------------------------
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def config_dir() -> str | None:
    """Folder of the shipped YAMLs: ``mdistiller_blockkd/configs`` in an installed wheel,
    the checkout's ``configs/`` when the package runs from a source tree; ``None`` if neither exists."""
    for folder in (os.path.join(_PACKAGE_DIR, "configs"), os.path.join(os.path.dirname(_PACKAGE_DIR), "configs")):
        if os.path.isdir(folder):
            return folder
    return None


def list_configs() -> list[str]:
    """Short names of every shipped config (``cifar100/blockkd/res56_res20``...), sorted."""
    root = config_dir()
    if root is None:
        return []
    names = []
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".yaml", ".yml")):
                rel = os.path.relpath(os.path.join(folder, f), root)
                names.append(os.path.splitext(rel)[0].replace(os.sep, "/"))
    return sorted(names)


def shipped_config(name: str) -> str | None:
    """Path of the shipped config called ``name`` (``cifar100/kd/res56_res20``, optionally with a
    leading ``configs/`` and a ``.yaml`` ending); ``None`` when there is none."""
    root = config_dir()
    short = str(name).replace("\\", "/").strip()
    if root is None or not short or os.path.isabs(short):
        return None
    while short.startswith("./"):
        short = short[2:]
    if short.startswith("configs/"):
        short = short[len("configs/"):]
    for candidate in (short, short + ".yaml", short + ".yml"):
        path = os.path.join(root, *candidate.split("/"))
        if candidate.endswith((".yaml", ".yml")) and os.path.isfile(path):
            return path
    return None


def resolve_config(name: str) -> str:
    """The YAML file ``name`` stands for: an existing file as given, else a shipped config's path.

    Raises :class:`ConfigError` naming ``name`` (and shipped configs of the same
    folder, when there are any) when neither exists.
    """
    name = os.fspath(name)
    if os.path.isfile(name):
        return name
    found = shipped_config(name)
    if found:
        return found
    stem = str(name).replace("\\", "/")
    stem = stem[len("configs/"):] if stem.startswith("configs/") else stem
    folder = stem.rsplit("/", 1)[0] + "/" if "/" in stem else ""
    near = [c for c in list_configs() if folder and c.startswith(folder)][:6]
    hint = (f"; shipped configs there: {', '.join(near)}" if near
            else "; give a YAML file, or a shipped config's short name such as cifar100/blockkd/res56_res20 "
                 "(list them with: python -m mdistiller_blockkd configs)")
    raise ConfigError(f"config file '{name}' not found{hint}")
