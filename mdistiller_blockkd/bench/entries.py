"""Benchmark entries: what ``--cfg``, ``--pairs`` x ``--distillers`` and ``--variants`` ask to time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..config import load_cfg
from ..distillers import distiller_dict
from ..errors import ConfigError
from ..models import list_models
from ..results.labels import bare_label_keys, method_sort_key, variant_label
from ..utils.overrides import split_overrides, split_top_level
from ..utils.precision import AMP_DTYPES, precision_name, resolve_amp

__all__ = ["Entry", "STEP_KEYS", "DEFAULT_PAIR", "default_distillers", "parse_pair", "parse_variant", "build_entries"]

#: Solver keys a ``--variants`` entry may set: they change what a step computes, not the model.
STEP_KEYS = ("SOLVER.AMP", "SOLVER.CHANNELS_LAST")
DEFAULT_PAIR = ("resnet56", "resnet20")
_PAIR_RE = re.compile(r"^(timm:[^:]+|[^:]+):(timm:[^:]+|[^:]+)$")


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


def default_distillers() -> List[str]:
    """Every registered distiller, in table order (outside packages' included)."""
    return sorted(distiller_dict, key=method_sort_key)


def parse_pair(text: str) -> Tuple[str, str]:
    """``"resnet56:resnet20"`` -> ``("resnet56", "resnet20")`` (``timm:<name>`` allowed on either side)."""
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


def _make_cfg(base: Optional[str], opts: List, image_size: int, num_classes: int):
    """Load ``base`` + ``opts``, then set the dataset sizes so shape-deriving distillers (ReviewKD) see the batch."""
    cfg = load_cfg(base, opts)
    extra = ["DATASET.IMAGE_SIZE", image_size, "DATASET.SYNTHETIC.IMAGE_SIZE", image_size,
             "DATASET.SYNTHETIC.NUM_CLASSES", num_classes]
    if image_size != 32 and str(cfg.DATASET.TYPE).lower() not in ("imagenet", "synthetic", "coco"):
        extra += ["DATASET.TYPE", "synthetic"]
    return load_cfg(base, list(opts) + extra)


def build_entries(args, overrides: List[str]) -> List[Entry]:
    """Every entry asked for by ``--cfg``, ``--pairs`` x ``--distillers`` and ``--variants`` (duplicates dropped)."""
    entries: List[Entry] = []
    seen = set()
    base_of: Dict[Tuple[str, str], str] = {}
    pairs: List[Tuple[str, str]] = []

    def add(entry: Entry):
        if entry.key in seen:
            print(f"note: {entry.name} from {entry.source} is already listed; measured once")
            return
        seen.add(entry.key)
        entries.append(entry)

    def entry(t, s, kind, label, cfg, source) -> Entry:
        return Entry(t, s, kind, label, cfg, source, amp=resolve_amp(cfg.SOLVER.AMP, args.device),
                     channels_last=bool(cfg.SOLVER.CHANNELS_LAST))

    def pair_opts(kind, t, s):
        return ["DISTILLER.TYPE", kind, "DISTILLER.TEACHER", t, "DISTILLER.STUDENT", s]

    for path in args.cfg or []:
        cfg = _make_cfg(path, overrides, args.image_size, args.num_classes)
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
        if not name.startswith(("timm:", "fasterrcnn_")) and name not in known:  # fasterrcnn_*: detection configs
            raise ConfigError(f"unknown model '{name}'; known CIFAR models: {', '.join(sorted(known))}, "
                              "or 'timm:<timm model name>'")

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
            cfg = _make_cfg(base, pair_opts(kind, t, s) + overrides, args.image_size, args.num_classes)
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
            cfg = _make_cfg(base, pair_opts(kind, t, s) + overrides + flat, args.image_size, args.num_classes)
            add(entry(t, s, kind, label, cfg, f"--variants {spec}"))
    if not entries:
        raise ConfigError("nothing to benchmark: give --cfg FILE, or --pairs T:S with --distillers")
    return entries
