"""Benchmark entries: what ``--cfg``, ``--pairs`` x ``--distillers`` and ``--variants`` ask to time.

An entry is a text entry when its config's ``DATASET.TYPE`` is text (``glue`` / ``tsv``):
a ``--cfg`` text config, or a ``--pairs`` pair of two ``hf:`` models (given ``DATASET.TYPE
tsv``); its config's ``DATASET.TEXT.MAX_LENGTH`` is ``--seq-len``, the length of its batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..config import load_cfg
from ..distillers import distiller_dict
from ..engine.build import check_text_models, is_text
from ..errors import ConfigError
from ..models import list_models
from ..models.hf_encoder import check_max_length
from ..results.labels import bare_label_keys, method_sort_key, variant_label
from ..utils.overrides import split_overrides, split_top_level
from ..utils.precision import AMP_DTYPES, precision_name, resolve_amp

__all__ = ["Entry", "STEP_KEYS", "DEFAULT_PAIR", "IMAGE_SIZE", "SEQ_LEN", "input_sizes", "default_distillers",
           "parse_pair", "parse_variant", "build_entries"]

#: Solver keys a ``--variants`` entry may set: they change what a step computes, not the model.
STEP_KEYS = ("SOLVER.AMP", "SOLVER.CHANNELS_LAST")
DEFAULT_PAIR = ("resnet56", "resnet20")
_PAIR_RE = re.compile(r"^((?:timm|hf):[^:]+|[^:]+):((?:timm|hf):[^:]+|[^:]+)$")
#: The defaults of ``--image-size`` (image entries) and ``--seq-len`` (text entries).
IMAGE_SIZE, SEQ_LEN = 32, 64


@dataclass
class Entry:
    """One timed configuration and, once built, its distiller, optimiser and batch."""

    teacher: str
    student: str
    distiller: str
    variant: str
    cfg: object
    source: str
    model: Optional[torch.nn.Module] = None
    opt: Optional[object] = None  # engine.optim.Optim: the trainer's optimizer, scheduler and clipping
    scaler: Optional[object] = None
    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    epoch: float = 240.0
    times_ms: List[float] = field(default_factory=list)
    peak_mem_mb: Optional[float] = None
    peak_mem_half_mb: Optional[float] = None  # at half the batch (``--budget-mib``: the per-image cost)
    amp: str = "off"  # the explicit SOLVER.AMP setting of the entry (auto resolved on the device)
    channels_last: bool = False

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.amp]

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``, with `` CL`` for channels-last."""
        return precision_name(self.amp) + (" CL" if self.channels_last else "")

    @property
    def key(self) -> Tuple[str, str, str, str, str]:
        return self.teacher, self.student, self.distiller, self.variant, self.precision

    @property
    def name(self) -> str:
        v = f" [{self.variant}]" if self.variant else ""
        return f"{self.distiller}{v} ({self.precision}) {self.teacher}->{self.student}"


def input_sizes(args) -> Tuple[int, int]:
    """``(image side, tokens per sequence)`` of the synthetic batches: ``--image-size`` and ``--seq-len``, or
    :data:`IMAGE_SIZE` / :data:`SEQ_LEN` where not given."""
    image_size, seq_len = getattr(args, "image_size", None), getattr(args, "seq_len", None)
    return IMAGE_SIZE if image_size is None else image_size, SEQ_LEN if seq_len is None else seq_len


def default_distillers() -> List[str]:
    """Every registered distiller, in table order (outside packages' included)."""
    return sorted(distiller_dict, key=method_sort_key)


def parse_pair(text: str) -> Tuple[str, str]:
    """``"resnet56:resnet20"`` -> ``("resnet56", "resnet20")`` (``timm:<name>`` and ``hf:<folder>[,options]``
    allowed on either side; an ``hf:`` folder holds no ``:``)."""
    m = _PAIR_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--pairs entry '{text}' must read TEACHER:STUDENT, e.g. resnet56:resnet20")
    return m.group(1), m.group(2)


def parse_variant(spec: str) -> Tuple[Optional[str], List[str], str]:
    """``"BLOCKKD.STONES=last:2,SOLVER.AMP=bf16"`` -> ``("BLOCKKD", [KEY, VALUE, ...], "last:2")``.

    Several overrides are separated by commas (outside brackets). Keys are those of at most
    one distiller's node (the variant is an entry of that distiller alone) and the
    step-changing solver keys :data:`STEP_KEYS` (``SOLVER.AMP``, ``SOLVER.CHANNELS_LAST``). A
    variant without a distiller key is an entry of every benchmarked distiller (``None``).
    The label names the distiller keys: the bare value for the keys the report tool labels by
    (``BLOCKKD.STONES``, ``BLOCKKD.LOGIT_LOSS``, ``BLOCKKD.CONNECTOR``), else ``KEY=value`` with
    the last key component; the precision and layout have their own column.
    """
    parts = split_top_level(spec, ",")
    if not parts or any("=" not in p for p in parts):
        raise ConfigError(f"--variants entry '{spec}' must read NODE.KEY=VALUE[,NODE.KEY=VALUE], "
                          "e.g. BLOCKKD.STONES=sample:1 or SOLVER.AMP=bf16")
    flat = split_overrides(parts)
    keys = [k.upper() for k in flat[0::2]]
    step = [k for k in keys if k in STEP_KEYS]
    nodes = {k.split(".", 1)[0] for k in keys if k not in STEP_KEYS}
    if len(nodes) > 1 or (nodes and next(iter(nodes)) not in distiller_dict):
        raise ConfigError(f"--variants entry '{spec}': keys must belong to one registered distiller's node "
                          f"({', '.join(sorted(distiller_dict))}) or be step settings ({', '.join(STEP_KEYS)}); "
                          "put other keys in the trailing KEY=VALUE overrides")
    node = nodes.pop() if nodes else None
    labels = []
    for key, value in zip(flat[0::2], flat[1::2]):
        if key.upper() in step:
            continue
        labels.append(value if key in bare_label_keys() else f"{key.rsplit('.', 1)[-1]}={value}")
    return node, flat, " ".join(labels)


def _variant_name(cfg, spec_label: str) -> str:
    """A ``--variants`` entry's name: every method option its config sets off the package default, as the report
    names a run (``last:2 linear_ln`` when a trailing override sets the connector), then the spec's other words
    (``GAMMA=0.0``), so the report's ``--cost`` finds the row of a run trained with that config."""
    words = variant_label(cfg).split()
    return " ".join(words + [w for w in spec_label.split() if w not in words])


def _make_cfg(base: Optional[str], opts: List, image_size: int, num_classes: int, seq_len: int):
    """Load ``base`` + ``opts``, then set the dataset sizes so shape-deriving distillers (ReviewKD) see the batch
    (text: ``DATASET.TEXT.MAX_LENGTH`` is the batch's length)."""
    cfg = load_cfg(base, opts)
    extra = ["DATASET.IMAGE_SIZE", image_size, "DATASET.SYNTHETIC.IMAGE_SIZE", image_size,
             "DATASET.SYNTHETIC.NUM_CLASSES", num_classes]
    if image_size != 32 and not is_text(cfg) and str(cfg.DATASET.TYPE).lower() not in ("imagenet", "synthetic", "coco"):
        extra += ["DATASET.TYPE", "synthetic"]
    cfg = load_cfg(base, list(opts) + extra)
    if is_text(cfg):  # set, not loaded: the config's own lower bound is for real data
        cfg.defrost()
        cfg.DATASET.TEXT.MAX_LENGTH = seq_len
        cfg.freeze()
    return cfg


def _is_text_pair(teacher: str, student: str) -> bool:
    """Two ``hf:`` models: a text pair; an ``hf:`` model with an image model is one :class:`ConfigError`."""
    if teacher.startswith("hf:") != student.startswith("hf:"):
        raise ConfigError(f"the pair {teacher}:{student} mixes a text model (hf:) and an image model; benchmark two "
                          "hf: models (a text pair) or two image models")
    return teacher.startswith("hf:")


def build_entries(args, overrides: List[str]) -> List[Entry]:
    """Every entry asked for by ``--cfg``, ``--pairs`` x ``--distillers`` and ``--variants`` (duplicates dropped)."""
    entries: List[Entry] = []
    image_size, seq_len = input_sizes(args)
    seen = set()
    checked = set()
    base_of: Dict[Tuple[str, str], str] = {}
    pairs: List[Tuple[str, str]] = []

    def add(entry: Entry):
        if entry.key in seen:
            print(f"note: {entry.name} from {entry.source} is already listed; measured once")
            return
        seen.add(entry.key)
        entries.append(entry)

    def entry(t, s, kind, label, cfg, source) -> Entry:
        e = Entry(t, s, kind, label, cfg, source, amp=resolve_amp(cfg.SOLVER.AMP, args.device),
                  channels_last=bool(cfg.SOLVER.CHANNELS_LAST))
        text = is_text(cfg)
        if text and e.channels_last:
            raise ConfigError(f"{e.name} (from {source}): SOLVER.CHANNELS_LAST True is a layout of image batches; a "
                              "text batch is (B, 3, L) token ids: leave out --channels-last and SOLVER.CHANNELS_LAST "
                              "for text pairs")
        if (t, s, kind == "NONE", text) not in checked:  # as the trainer checks them; config files only
            if text:
                for name in (s,) if kind == "NONE" else (t, s):
                    check_max_length(name, seq_len, "--seq-len")
            check_text_models(cfg, kind)
            checked.add((t, s, kind == "NONE", text))
        return e

    def pair_opts(kind, t, s, base):
        text = base is None and _is_text_pair(t, s)  # a pair of --pairs: no dataset of its own
        return ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", t, "DISTILLER.STUDENT", s] + (
            ["DATASET.TYPE", "tsv"] if text else [])

    for path in args.cfg or []:
        cfg = _make_cfg(path, overrides, image_size, args.num_classes, seq_len)
        kind = str(cfg.DISTILLER.TYPE).upper()
        if kind not in distiller_dict:
            raise ConfigError(f"{path}: DISTILLER.TYPE '{cfg.DISTILLER.TYPE}' is not registered; "
                              f"use one of {', '.join(sorted(distiller_dict))}")
        pair = (str(cfg.DISTILLER.TEACHER), str(cfg.DISTILLER.STUDENT))
        base_of.setdefault(pair, path)
        if pair not in pairs:
            pairs.append(pair)
        add(entry(pair[0], pair[1], kind, variant_label(cfg), cfg, path))

    for text in args.pairs or []:
        pair = parse_pair(text)
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        pairs.append(DEFAULT_PAIR)
    known = set(list_models())
    for name in {n for pair in pairs for n in pair}:
        if not name.startswith(("timm:", "hf:", "fasterrcnn_")) and name not in known:  # fasterrcnn_*: detection
            raise ConfigError(f"unknown model '{name}'; known CIFAR models: {', '.join(sorted(known))}, "
                              "'timm:<timm model name>' or 'hf:<folder of a Hugging Face encoder>'")

    if args.distillers is not None:
        names = [d.upper() for d in args.distillers]
        unknown = [d for d in names if d not in distiller_dict]
        if unknown:
            raise ConfigError(f"--distillers: {', '.join(unknown)} not registered; "
                              f"use some of {', '.join(sorted(distiller_dict))}")
    elif args.pairs or not args.cfg:
        names = default_distillers()
    else:
        names = []

    for t, s in pairs:
        base = base_of.get((t, s))
        for kind in names:
            cfg = _make_cfg(base, pair_opts(kind, t, s, base) + overrides, image_size, args.num_classes, seq_len)
            add(entry(t, s, kind, variant_label(cfg), cfg, base or "--pairs"))

    base_entries = list(entries)
    for spec in args.variants or []:
        kind, flat, label = parse_variant(spec)
        if kind is None:  # step settings only: a twin of every entry so far, its own settings kept
            for b in base_entries:
                cfg = b.cfg.clone()
                cfg.defrost()
                cfg.merge_from_list(list(flat))
                cfg.freeze()
                add(entry(b.teacher, b.student, b.distiller, b.variant, cfg, f"--variants {spec}"))
            continue
        for t, s in pairs:
            base = base_of.get((t, s))
            cfg = _make_cfg(base, pair_opts(kind, t, s, base) + overrides + flat, image_size, args.num_classes,
                            seq_len)
            add(entry(t, s, kind, _variant_name(cfg, label), cfg, f"--variants {spec}"))
    if not entries:
        raise ConfigError("nothing to benchmark: give --cfg FILE, or --pairs T:S with --distillers")
    text = sum(is_text(e.cfg) for e in entries)
    if getattr(args, "seq_len", None) is not None and not text:
        raise ConfigError(f"--seq-len {args.seq_len} is the length of text batches, but every entry is an image pair; "
                          "leave it out (text pairs: two hf: models, or a --cfg with DATASET.TYPE tsv or glue)")
    if getattr(args, "image_size", None) is not None and text == len(entries):
        raise ConfigError(f"--image-size {args.image_size} is the side of image batches, but every entry is a text "
                          "pair; leave it out (their batch length is --seq-len)")
    return entries
