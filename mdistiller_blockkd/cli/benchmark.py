"""Time full training steps of distillers side by side, in one process, on synthetic batches.

For every (teacher -> student pair, distiller, variant) entry the tool builds the
distiller with randomly initialised models (no checkpoint: timing only), an SGD
optimiser over ``get_learnable_parameters()``, and one fixed random batch
(``--batch-size`` images of ``3 x --image-size x --image-size``, labels in
``[0, --num-classes)``). A *step* is exactly what the trainer does:
``forward_train`` -> sum of the loss terms -> ``backward`` -> ``SGD.step`` ->
``zero_grad``.

Procedure
    1. Warm-up pass, one entry after the other: build the entry, run ``--warmup``
       steps (the first step also builds the BN-folded teacher copy), and record its
       peak memory. CUDA: ``torch.cuda.max_memory_allocated`` above the memory in use
       before the entry was built. CPU: the growth of the process's peak resident set
       size over its resident size before the entry was built (Linux resets the peak
       through ``/proc/self/clear_refs``; elsewhere ``getrusage().ru_maxrss`` is used,
       which cannot be reset). The CPU number is approximate: the allocator reuses
       memory freed by earlier entries, and thread pools grow once.
    2. Timed pass: ``--steps`` rounds; each round runs ONE step of every entry in turn
       (round-robin, starting one entry later each round), so drift of the machine
       (clock boost, thermal throttling, other processes) hits every entry alike.
       CUDA steps are synchronised before and after. A Block-KD ``every:K`` entry's
       timed step is one whole cycle of K steps (one with stones, K-1 without),
       divided by K, so its median is the mean cost per step.

Reported per entry: median ms/step, images/s (``batch / median``), peak memory (MiB)
and ``ratio_to_kd``, the median divided by the median of plain ``KD`` on the same
pair (``null`` when KD was not run).

Entries
    ``--cfg FILE ...``        one entry per YAML config (its pair, DISTILLER.TYPE and
                              Block-KD variant, e.g. ``BLOCKKD.STONES``); a detection
                              config (DATASET.TYPE coco) times its Faster R-CNN
                              distiller (random teacher) on random images with 1-3
                              random boxes each, labels in [1, --num-classes);
    ``--pairs T:S ...``       pairs, each run with every ``--distillers`` name
                              (default: every registered one of NONE KD DKD REVIEWKD
                              BLOCKKD); ``--distillers`` also applies to the pairs of
                              ``--cfg`` files, whose settings are then kept;
    ``--variants SPEC ...``   extra entries per pair: ``NODE.KEY=VALUE[,NODE.KEY=VALUE]``
                              with NODE a distiller, e.g. ``BLOCKKD.STONES=sample:1``
                              (reported with variant ``sample:1``);
    trailing ``KEY=VALUE``    config overrides applied to every entry.
    With neither ``--cfg`` nor ``--pairs``: ``--pairs resnet56:resnet20``.

``--cost-model`` also prints, for every Block-KD entry, the cost-model ratio to KD
(backward ~ 2x forward for trained layers, ~ 1x for frozen layers that only
pass input gradients):

    cost(KD)       = 3 F(S) + F(T)
    cost(BLOCKKD)  = 3 F(S) + F(T) + sum_i [2 F(T_{j(i)+1..n} + head) + 3 F(C_i)]

over the stones of the entry (``all``: every stone; ``last:K``: the K deepest;
``sample:K``: the expectation over K stones drawn uniformly, i.e. K/n of the sum).
F is measured twice on the entry's batch: forward FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products) and
median forward wall time of each piece (student, BN-folded teacher, each teacher tail
through the staged view, each connector). With ``--json`` the numbers are written under
an extra top-level key ``cost_model``.

Examples (from the repository root, no installation needed)::

    mdistiller-blockkd-benchmark --pairs resnet56:resnet20 resnet32x4:resnet8x4 \\
        --distillers NONE KD DKD REVIEWKD BLOCKKD --variants BLOCKKD.STONES=sample:1 \\
        --device cuda --amp bf16 --channels-last --json bench.json
    mdistiller-blockkd-benchmark --cfg detection/fmnist_det/{kd,vanilla,dkd,blockkd} \\
        --batch-size 8 --image-size 96 --num-classes 11 --threads 1   # detection (DATASET.TYPE coco)
    mdistiller-blockkd-benchmark --cfg cifar100/blockkd/res56_res20 \\
        --distillers KD --cost-model --threads 4 --steps 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..detection.task import DetectionTask, benchmark_batch, build_detection_distiller, is_detection
from ..distillers import distiller_dict
from ..config import load_cfg
from ..errors import ConfigError, run_cli
from ..models import build_model, list_models
from .common import (
    BARE_LABEL_KEYS,
    atomic_write_text,
    check_output_path,
    split_overrides,
    split_top_level,
    variant_label,
)

DEFAULT_DISTILLERS = ("NONE", "KD", "DKD", "REVIEWKD", "BLOCKKD")
DEFAULT_PAIR = ("resnet56", "resnet20")
MIB = 2.0 ** 20
_PAIR_RE = re.compile(r"^(timm:[^:]+|[^:]+):(timm:[^:]+|[^:]+)$")


# -- entries ------------------------------------------------------------------------
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
    opt: Optional[torch.optim.Optimizer] = None
    scaler: Optional[object] = None
    x: Optional[torch.Tensor] = None
    y: Optional[torch.Tensor] = None
    epoch: float = 240.0
    times_ms: List[float] = field(default_factory=list)
    peak_mem_mb: Optional[float] = None

    @property
    def key(self) -> Tuple[str, str, str, str]:
        return self.teacher, self.student, self.distiller, self.variant

    @property
    def name(self) -> str:
        v = f" [{self.variant}]" if self.variant else ""
        return f"{self.distiller}{v} {self.teacher}->{self.student}"


def parse_pair(text: str) -> Tuple[str, str]:
    """``"resnet56:resnet20"`` -> ``("resnet56", "resnet20")`` (``timm:<name>`` allowed on either side)."""
    m = _PAIR_RE.match(text.strip())
    if not m:
        raise ConfigError(f"--pairs entry '{text}' must read TEACHER:STUDENT, e.g. resnet56:resnet20")
    return m.group(1), m.group(2)


def parse_variant(spec: str) -> Tuple[str, List[str], str]:
    """``"BLOCKKD.STONES=sample:1"`` -> ``("BLOCKKD", ["BLOCKKD.STONES", "sample:1"], "sample:1")``.

    Several overrides are separated by commas (outside brackets); they must all be keys
    of one distiller's node. The label is the bare value for the keys the report tool
    labels by (``BLOCKKD.STONES``, ``BLOCKKD.LOGIT_LOSS``, ``BLOCKKD.CONNECTOR``), else
    ``KEY=value`` with the last key component.
    """
    parts = split_top_level(spec, ",")
    if not parts or any("=" not in p for p in parts):
        raise ConfigError(f"--variants entry '{spec}' must read NODE.KEY=VALUE[,NODE.KEY=VALUE], "
                          "e.g. BLOCKKD.STONES=sample:1")
    flat = split_overrides(parts)
    nodes = {k.split(".", 1)[0].upper() for k in flat[0::2]}
    if len(nodes) != 1 or next(iter(nodes)) not in distiller_dict:
        raise ConfigError(f"--variants entry '{spec}': every key must belong to one registered distiller's node "
                          f"({', '.join(sorted(distiller_dict))}); put other keys in the trailing KEY=VALUE overrides")
    node = nodes.pop()
    labels = []
    for key, value in zip(flat[0::2], flat[1::2]):
        labels.append(value if key in BARE_LABEL_KEYS else f"{key.rsplit('.', 1)[-1]}={value}")
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
        add(Entry(pair[0], pair[1], kind, variant_label(cfg), cfg, path))

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
        names = [d for d in DEFAULT_DISTILLERS if d in distiller_dict]
        missing = [d for d in DEFAULT_DISTILLERS if d not in distiller_dict]
        if missing:
            print(f"note: {', '.join(missing)} not registered in this checkout; skipped")
    else:
        names = []

    for t, s in pairs:
        base = base_of.get((t, s))
        for kind in names:
            cfg = _make_cfg(base, pair_opts(kind, t, s) + overrides, args.image_size, args.num_classes)
            add(Entry(t, s, kind, variant_label(cfg), cfg, base or "--pairs"))

    for spec in args.variants or []:
        kind, flat, label = parse_variant(spec)
        for t, s in pairs:
            base = base_of.get((t, s))
            cfg = _make_cfg(base, pair_opts(kind, t, s) + overrides + flat, args.image_size, args.num_classes)
            add(Entry(t, s, kind, label, cfg, f"--variants {spec}"))
    if not entries:
        raise ConfigError("nothing to benchmark: give --cfg FILE, or --pairs T:S with --distillers")
    return entries


# -- memory -------------------------------------------------------------------------
def _proc_status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


class PeakMemory:
    """Peak memory of the code run between :meth:`start` and :meth:`stop`, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.reset_ok = False
        try:  # Linux: reset the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = _proc_status_kib("VmHWM") is not None
        except OSError:
            pass
        rss = _proc_status_kib("VmRSS")
        self.base = rss * 1024 if rss is not None else _ru_maxrss_bytes()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        peak = _proc_status_kib("VmHWM") * 1024 if self.reset_ok else _ru_maxrss_bytes()
        return max(0, peak - self.base) / MIB


# -- steps --------------------------------------------------------------------------
class Runner:
    """Builds entries and runs their training steps with the chosen device / AMP / layout."""

    def __init__(self, args):
        try:
            self.device = torch.device(args.device)
        except RuntimeError:
            raise ConfigError(f"--device '{args.device}' is not a device; use cpu or cuda[:N]") from None
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError("--device cuda asked for but CUDA is not available; use --device cpu")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cudnn.benchmark = True
        elif self.device.type != "cpu":
            raise ConfigError(f"--device '{args.device}' is not supported; use cpu or cuda[:N]")
        self.amp_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.channels_last = args.channels_last
        self.batch_size, self.image_size, self.num_classes = args.batch_size, args.image_size, args.num_classes
        self.seed = args.seed

    def prime(self):
        """One small convolutional training step, so one-time library set-up (kernel caches,
        thread pools, CUDA context) is not charged to the first entry's memory or time."""
        torch.manual_seed(self.seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, self.num_classes))
        net.to(self.device)
        x = torch.randn(2, 3, self.image_size, self.image_size, device=self.device)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        with self.autocast():
            loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(2, dtype=torch.long, device=self.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.sync()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def build(self, e: Entry):
        """Build ``e``'s models, distiller, optimiser and batch on the device."""
        torch.manual_seed(self.seed)
        if is_detection(e.cfg):  # torchvision Faster R-CNN: random teacher, fixed random boxes (timing only)
            model = build_detection_distiller(e.cfg, self.num_classes, load_teacher=False)
        else:
            student = build_model(e.student, num_classes=self.num_classes)
            teacher = None if e.distiller == "NONE" else build_model(e.teacher, num_classes=self.num_classes)
            model = distiller_dict[e.distiller](student, teacher, e.cfg, input_size=self.image_size)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        sol = e.cfg.SOLVER
        e.opt = torch.optim.SGD(model.get_learnable_parameters(), lr=float(sol.LR), momentum=float(sol.MOMENTUM),
                                weight_decay=float(sol.WEIGHT_DECAY))
        e.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)
        g = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        e.x = x.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        e.y = y.to(self.device)
        if is_detection(e.cfg):
            images, targets = benchmark_batch(self.batch_size, self.image_size, self.num_classes, self.seed)
            e.x, e.y = DetectionTask(None).to_device(images, targets, self.device)
        e.epoch = float(max(int(e.cfg.SOLVER.EPOCHS), 1))  # past every warm-up: all loss terms active
        e.model = model

    def step(self, e: Entry) -> torch.Tensor:
        """One training step: forward_train, sum of losses, backward, SGD step, zero_grad."""
        with self.autocast():
            _, losses = e.model.forward_train(image=e.x, target=e.y, epoch=e.epoch)
            loss = sum(losses.values())
        e.scaler.scale(loss).backward()
        e.scaler.step(e.opt)
        e.scaler.update()
        e.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def timed_step(self, e: Entry) -> float:
        """Mean ms of one step over a whole cycle of the entry's schedule (Block-KD ``every:K``: K steps)."""
        cycle = e.model.k if getattr(e.model, "mode", None) == "every" else 1
        self.sync()
        t0 = time.perf_counter()
        for _ in range(cycle):
            self.step(e)
        self.sync()
        return (time.perf_counter() - t0) * 1000.0 / cycle

    def time_forward(self, fn: Callable[[], object], reps: int) -> float:
        """Median wall time (ms) of ``fn`` after one untimed call."""
        fn()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append((time.perf_counter() - t0) * 1000.0)
        return statistics.median(out)


# -- cost model ---------------------------------------------------------------------
def count_flops(fn: Callable[[], object]) -> Optional[int]:
    """Forward FLOPs of ``fn()`` by ``FlopCounterMode`` (None when it cannot count)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - very old torch
        return None
    try:
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())
    except Exception as exc:  # noqa: BLE001 - counting is best-effort; timing still reported
        print(f"note: FLOP counting failed ({type(exc).__name__}: {exc}); cost model from times only")
        return None


def stone_share(mode: str, k: int, n: int) -> List[float]:
    """Expected number of times each of the ``n`` stones runs per step under ``STONES`` = ``mode:k``."""
    if mode == "all":
        return [1.0] * n
    if mode == "last":
        return [0.0] * (n - k) + [1.0] * k
    if mode == "sample":
        return [k / n] * n
    if mode == "every":
        return [1.0 / k] * n
    raise ValueError(f"unknown stone mode '{mode}'")


def blockkd_costs(F_s: float, F_t: float, tails: Sequence[float], conns: Sequence[float],
                  share: Sequence[float]) -> Tuple[float, float]:
    """``(cost(KD), cost(BLOCKKD))`` from forward costs: see the module docstring."""
    kd = 3.0 * F_s + F_t
    extra = sum(p * (2.0 * tl + 3.0 * c) for p, tl, c in zip(share, tails, conns))
    return kd, kd + extra


@torch.no_grad()
def cost_model(runner: Runner, e: Entry, reps: int = 5) -> dict:
    """Cost-model numbers of a BLOCKKD entry, measured on its batch (forward only, no autograd)."""
    m = e.model
    x = e.x
    if not hasattr(m, "pairs") or not hasattr(m, "connectors"):
        raise ConfigError(f"--cost-model needs a Block-KD distiller; {e.distiller} has no stepping stones")
    tmodel = m.teacher_model(x)
    tview = tmodel.staged_view()
    with runner.autocast():
        outs = m.sview.block_outputs(x)
    pieces: List[Tuple[str, Callable[[], object]]] = [("student", lambda: m.student(x)), ("teacher", lambda: tmodel(x))]
    for k, (i, j) in enumerate(m.pairs):
        h = outs[i]
        conn = m.connectors[k]
        with runner.autocast():
            c = conn(h)
        pieces.append((f"connector{k + 1}", lambda conn=conn, h=h: conn(h)))
        pieces.append((f"tail{k + 1}", lambda c=c, j=j: tview.forward_from(c, j + 1)))
    flops, times = {}, {}
    for name, fn in pieces:
        def run(fn=fn):
            with runner.autocast():
                return fn()
        flops[name] = count_flops(run)
        times[name] = runner.time_forward(run, reps)
    n = len(m.pairs)
    share = stone_share(m.mode, m.k, n)
    names_t = [f"tail{k + 1}" for k in range(n)]
    names_c = [f"connector{k + 1}" for k in range(n)]
    out = {
        "teacher": e.teacher, "student": e.student, "variant": e.variant, "stones": f"{m.mode}:{m.k}" if m.mode != "all" else "all",
        "num_stones": n, "pairs": [[i + 1, j + 1] for i, j in m.pairs],
        "forward_ms": {k: round(v, 4) for k, v in times.items()},
        "forward_gflops": None, "flops_ratio_to_kd": None,
    }
    kd_t, bk_t = blockkd_costs(times["student"], times["teacher"], [times[k] for k in names_t],
                               [times[k] for k in names_c], share)
    out["time_ratio_to_kd"] = bk_t / kd_t if kd_t > 0 else None
    if all(v is not None for v in flops.values()):
        kd_f, bk_f = blockkd_costs(flops["student"], flops["teacher"], [flops[k] for k in names_t],
                                   [flops[k] for k in names_c], share)
        out["forward_gflops"] = {k: v / 1e9 for k, v in flops.items()}
        out["flops_ratio_to_kd"] = bk_f / kd_f if kd_f > 0 else None
    return out


# -- output -------------------------------------------------------------------------
def _fmt(v, nd=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: List[List[str]], header: List[str]) -> str:
    """Plain fixed-width table."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine() or 'unknown'}, {os.cpu_count()} logical cores)"


def results_of(entries: List[Entry], batch_size: int) -> List[dict]:
    """One result dict per entry (the ``--json`` schema)."""
    kd = {(e.teacher, e.student): statistics.median(e.times_ms) for e in entries
          if e.distiller == "KD" and not e.variant}
    out = []
    for e in entries:
        ms = statistics.median(e.times_ms)
        ref = kd.get((e.teacher, e.student))
        out.append({
            "teacher": e.teacher, "student": e.student, "distiller": e.distiller, "variant": e.variant,
            "batch_size": batch_size, "ms_per_step": round(ms, 4), "images_per_s": round(batch_size / (ms / 1000.0), 2),
            "peak_mem_mb": None if e.peak_mem_mb is None else round(e.peak_mem_mb, 2),
            "ratio_to_kd": None if ref is None else round(ms / ref, 4),
        })
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdistiller-blockkd-benchmark",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Procedure"):],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cfg", nargs="+", metavar="FILE", help="YAML configs, one entry each")
    p.add_argument("--pairs", nargs="+", metavar="T:S", help="teacher:student pairs, e.g. resnet56:resnet20")
    p.add_argument("--distillers", nargs="+", metavar="NAME",
                   help="distillers run on every pair (default with --pairs or no --cfg: NONE KD DKD REVIEWKD BLOCKKD)")
    p.add_argument("--variants", nargs="+", metavar="SPEC", default=[],
                   help="extra entries per pair, NODE.KEY=VALUE[,NODE.KEY=VALUE], e.g. BLOCKKD.STONES=sample:1")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--num-classes", type=int, default=100, help="classes of the models and labels (default 100)")
    p.add_argument("--image-size", type=int, default=32, help="square input size (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per entry before timing (default 3)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per entry, interleaved round-robin (default 10)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast dtype (fp16 adds a grad scaler)")
    p.add_argument("--channels-last", action="store_true", help="models and batch in channels_last memory format")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and batch (default 0)")
    p.add_argument("--cost-model", action="store_true", help="print the Block-KD cost-model ratio to KD (FLOPs and times)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides applied to every entry")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark; returns the exit status (errors in the input raise ``UserError``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "num_classes", "image_size", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be >= 1")
    if args.warmup < 0:
        raise ConfigError(f"--warmup is {args.warmup}; it must be >= 0")
    if not 0 <= args.seed < 2 ** 63 - 1:
        raise ConfigError(f"--seed is {args.seed}; it must be >= 0 and < 2**63 - 1")
    check_output_path(args.json, "--json")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads is {args.threads}; it must be >= 1")
        torch.set_num_threads(args.threads)
    overrides = split_overrides(args.opts)
    runner = Runner(args)
    entries = build_entries(args, overrides)

    print(f"device {device_description(runner.device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}x3x{args.image_size}x{args.image_size}, amp {args.amp}"
          f"{', channels_last' if args.channels_last else ''}; {len(entries)} entries, "
          f"{args.warmup} warm-up + {args.steps} interleaved steps each")
    runner.prime()
    mem = PeakMemory(runner.device)
    for e in entries:  # warm-up pass, one entry at a time (memory measured here)
        mem.start()
        runner.build(e)
        loss = None
        for _ in range(args.warmup):
            loss = runner.step(e)
        runner.sync()
        e.peak_mem_mb = mem.stop()
        if loss is not None and not torch.isfinite(loss).all():
            print(f"note: {e.name}: non-finite loss during warm-up (random weights); timing continues")
        print(f"  built {e.name} (from {e.source}), peak memory {e.peak_mem_mb:.1f} MiB")
    gc.collect()
    n = len(entries)
    for s in range(args.steps):  # round-robin, rotating the first entry each round
        for e in entries[s % n:] + entries[: s % n]:
            e.times_ms.append(runner.timed_step(e))

    results = results_of(entries, args.batch_size)
    header = ["teacher", "student", "distiller", "variant", "batch", "ms/step", "images/s", "peak MiB", "x KD"]
    rows = [[r["teacher"], r["student"], r["distiller"], r["variant"] or "-", r["batch_size"], _fmt(r["ms_per_step"], 2),
             _fmt(r["images_per_s"], 1), _fmt(r["peak_mem_mb"], 1), _fmt(r["ratio_to_kd"], 2)] for r in results]
    print()
    print(format_table(rows, header))
    print(f"(median of {args.steps} steps; peak memory: "
          f"{'CUDA max_memory_allocated' if runner.device.type == 'cuda' else 'approximate RSS growth'})")

    costs = None
    if args.cost_model:
        costs = []
        measured = {(r["teacher"], r["student"], r["distiller"], r["variant"]): r["ratio_to_kd"] for r in results}
        for e in entries:
            if e.distiller == "BLOCKKD":
                c = cost_model(runner, e)
                c["measured_ratio_to_kd"] = measured[e.key]
                costs.append(c)
        print()
        if not costs:
            print("cost model: no BLOCKKD entry to model")
        else:
            print("cost model (forward pieces on the batch): cost(KD) = 3F(S) + F(T); "
                  "BLOCKKD adds 2F(teacher tail + head) + 3F(connector) per stone (expected value for sample:K)")
            crow = []
            for c in costs:
                g = c["forward_gflops"]
                tails = [k for k in c["forward_ms"] if k.startswith("tail")]
                crow.append([c["teacher"], c["student"], c["variant"] or "-", c["stones"],
                             "-" if g is None else f"{g['student']:.3f}", "-" if g is None else f"{g['teacher']:.3f}",
                             "-" if g is None else " ".join(f"{g[k]:.3f}" for k in tails),
                             _fmt(c["flops_ratio_to_kd"], 2), _fmt(c["time_ratio_to_kd"], 2),
                             _fmt(c["measured_ratio_to_kd"], 2)])
            print(format_table(crow, ["teacher", "student", "variant", "stones", "GFLOP S", "GFLOP T",
                                      "GFLOP tails", "x KD (FLOPs)", "x KD (fwd times)", "x KD (measured)"]))

    if args.json:
        doc = {
            "results": results,
            "device": device_description(runner.device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "command": shlex.join(["mdistiller-blockkd-benchmark"] + argv),
        }
        if costs is not None:
            doc["cost_model"] = costs
        atomic_write_text(args.json, json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0



def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
