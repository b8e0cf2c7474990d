"""The benchmark's step runner: builds an entry on the device and runs its training steps."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch

from ..detection.task import DetectionTask, benchmark_batch, build_detection_distiller, is_detection
from ..distillers import distiller_dict
from ..engine.build import is_text
from ..engine.optim import build_optimizer, train_step
from ..errors import ConfigError
from ..models import build_model
from ..utils.precision import autocast
from ..utils.text_batch import pack_text_batch
from .entries import Entry, input_sizes
from .profile import profile_step, saved_tensor_bytes

__all__ = ["Runner"]


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
        self.batch_size, self.num_classes = args.batch_size, args.num_classes
        self.image_size, self.seq_len = input_sizes(args)
        self.seed = args.seed

    def prime(self, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False):
        """One small convolutional training step, so one-time library set-up (kernel caches,
        thread pools, CUDA context) is not charged to the first entry's memory or time.
        Run once per precision and layout of the entries."""
        torch.manual_seed(self.seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                  torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, self.num_classes))
        net.to(self.device)
        x = torch.randn(2, 3, self.image_size, self.image_size, device=self.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        with autocast(self.device, amp_dtype):
            loss = torch.nn.functional.cross_entropy(net(x), torch.zeros(2, dtype=torch.long, device=self.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.sync()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self, e: Entry):
        """Autocast with ``e``'s precision."""
        return autocast(self.device, e.amp_dtype)

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
        if e.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        e.opt = build_optimizer(e.cfg, model.get_learnable_parameters(), steps_per_epoch=1)  # the trainer's factory
        e.scaler = torch.amp.GradScaler(self.device.type, enabled=e.amp == "fp16")
        e.x, e.y = self.batch(e, model)
        e.epoch = float(max(int(e.cfg.SOLVER.EPOCHS), 1))  # past every warm-up: all loss terms active
        e.model = model

    def batch(self, e: Entry, model: torch.nn.Module):
        """``e``'s fixed random batch on the device, laid out as its task's loader gives it to the trainer.

        Images: ``(B, 3, S, S)`` normal values (channels-last with the entry's layout). Text:
        ``(B, 3, L)`` packed as :class:`~mdistiller_blockkd.data.text.TextCollator` packs a tokenised
        batch (:func:`~mdistiller_blockkd.utils.text_batch.pack_text_batch`): ids drawn uniformly from
        the vocabulary of ``model``'s teacher (its student for ``NONE``), a full attention mask, segment
        ids 0. Labels in ``[0, num_classes)``. Detection: random images with 1-3 random boxes each.
        """
        if is_detection(e.cfg):
            images, targets = benchmark_batch(self.batch_size, self.image_size, self.num_classes, self.seed)
            return DetectionTask(None).to_device(images, targets, self.device)
        g = torch.Generator().manual_seed(self.seed + 1)
        if is_text(e.cfg):
            vocab = int((model.teacher if model.teacher is not None else model.student).config.vocab_size)
            ids = torch.randint(0, vocab, (self.batch_size, self.seq_len), generator=g)
            x = pack_text_batch(ids, torch.ones_like(ids))
        else:
            x = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        layout = torch.channels_last if e.channels_last else torch.contiguous_format
        return x.to(self.device, memory_format=layout), y.to(self.device)

    def batch_shape(self, e: Entry) -> str:
        """The shape of :meth:`batch` in words: ``64x3x32x32`` (images) or ``64x64 tokens`` (text)."""
        if is_text(e.cfg):
            return f"{self.batch_size}x{self.seq_len} tokens"
        return f"{self.batch_size}x3x{self.image_size}x{self.image_size}"

    def step(self, e: Entry) -> torch.Tensor:
        """One training step: the trainer's own :func:`~mdistiller_blockkd.engine.optim.train_step`."""
        _, loss, _ = train_step(e.model, e.opt, e.scaler, e.x, e.y, e.epoch, self.autocast(e))
        return loss.detach()

    def profile(self, e: Entry, steps: int) -> Dict[str, float]:
        """Milliseconds per step of each part of ``e``'s step (:func:`~mdistiller_blockkd.bench.profile.profile_step`)."""
        teacher = getattr(e.model, "teacher", None)
        tex = e.model.teacher_model(e.x) if teacher is not None and hasattr(e.model, "teacher_model") else None
        return profile_step(lambda: self.step(e), e.model, tex, steps=steps)

    def saved_tensors(self, e: Entry) -> Dict[str, dict]:
        """What autograd keeps for backward in one of ``e``'s forward passes, per part
        (:func:`~mdistiller_blockkd.bench.profile.saved_tensor_bytes`)."""
        teacher = getattr(e.model, "teacher", None)
        tex = e.model.teacher_model(e.x) if teacher is not None and hasattr(e.model, "teacher_model") else None

        def forward():
            with self.autocast(e):
                return e.model.forward_train(image=e.x, target=e.y, epoch=e.epoch)
        return saved_tensor_bytes(forward, e.model, tex)

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
