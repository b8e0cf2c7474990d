"""The benchmark library: time full training steps of distillers side by side, in one process.

* :mod:`.entries` -- what to time (``--cfg``, ``--pairs`` x ``--distillers``, ``--variants``);
* :mod:`.runner` -- builds an entry and runs its steps;
* :mod:`.memory` -- peak memory per entry, measured in isolation;
* :mod:`.cost` -- the Block-KD cost model;
* :mod:`.profile` -- where a step's time goes;
* :mod:`.tables` -- the result records and tables.

:func:`run_benchmark` is the whole procedure; ``mdistiller-blockkd-benchmark`` parses
its arguments and calls it.
"""

from __future__ import annotations

import argparse
import gc
import shlex
from typing import Callable, List, Optional, Sequence

import torch

from ..errors import ConfigError
from .cost import cost_model
from .entries import Entry, build_entries
from .memory import PeakMemory, isolated_peak_mib
from .runner import Runner
from .tables import cost_table, device_description, profile_table, results_of, results_table, saved_table

__all__ = ["run_benchmark", "Entry", "Runner"]


def run_benchmark(args, overrides: Sequence[str], echo: Callable[[str], None] = print,
                  command: Optional[List[str]] = None) -> dict:
    """Build the entries of ``args`` (the benchmark command's options), measure them, print the tables; return the
    ``--json`` document (``results``, ``device``, ``torch``, ``threads``, ``command``, and ``cost_model`` /
    ``profile`` when asked for)."""
    runner = Runner(args)
    entries = build_entries(args, list(overrides))
    memory = getattr(args, "memory", "isolated")
    budget = getattr(args, "budget_mib", None)
    if memory == "isolated" and runner.device.type == "cuda" and budget is None:
        memory = "inline"  # the allocator's peak, reset per entry, is already the entry's own
    shapes = " and ".join(dict.fromkeys(runner.batch_shape(e) for e in entries))
    echo(f"device {device_description(runner.device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
         f"batch {shapes}; {len(entries)} entries, "
         f"{args.warmup} warm-up + {args.steps} interleaved steps each; memory: {memory}")
    if memory == "isolated":  # before this process builds anything: each entry in a fresh process
        half = argparse.Namespace(**{**vars(args), "batch_size": args.batch_size // 2})
        for e in entries:
            steps, threads = max(args.warmup, 1), torch.get_num_threads()
            e.peak_mem_mb = isolated_peak_mib(e, args, steps=steps, threads=threads)
            note = ""
            if budget is not None:  # a second batch size gives the per-example cost
                e.peak_mem_half_mb = isolated_peak_mib(e, half, steps=steps, threads=threads)
                note = f", {e.peak_mem_half_mb:.1f} MiB at batch {half.batch_size}"
            echo(f"  measured {e.name}: peak memory {e.peak_mem_mb:.1f} MiB{note} (fresh process)")
    for amp, cl in dict.fromkeys((e.amp_dtype, e.channels_last) for e in entries):
        runner.prime(amp, cl)
    mem = PeakMemory(runner.device)
    for e in entries:  # warm-up pass, one entry at a time
        runner.build(e)
        if memory == "inline":
            mem.start()
        loss = None
        for _ in range(args.warmup):
            loss = runner.step(e)
        runner.sync()
        if memory == "inline":
            e.peak_mem_mb = mem.stop()
        if loss is not None and not torch.isfinite(loss).all():
            echo(f"note: {e.name}: non-finite loss during warm-up (random weights); timing continues")
        echo(f"  built {e.name} (from {e.source})")
    gc.collect()
    n = len(entries)
    for s in range(args.steps):  # round-robin, rotating the first entry each round
        for e in entries[s % n:] + entries[: s % n]:
            e.times_ms.append(runner.timed_step(e))

    results = results_of(entries, args.batch_size, budget)
    echo("")
    echo(results_table(results))
    echo(f"(median of {args.steps} steps; x KD: against KD at the same precision and layout; x fp32: against the "
         "entry's own fp32 twin; peak MiB: growth of the peak over the built models during the warm-up steps, "
         + ("CUDA max_memory_allocated, reset per entry" if runner.device.type == "cuda" else
            "RSS of a fresh process per entry" if memory == "isolated" else "not measured")
         + (f"; batch in {budget:g} MiB: the largest batch whose peak fits that budget, linear in the batch between "
            f"the figures at batch {args.batch_size // 2} and {args.batch_size}" if budget is not None else "") + ")")
    doc = {"results": results, "device": device_description(runner.device), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "command": shlex.join(command or [])}

    if args.cost_model:
        measured = {e.key: r["ratio_to_kd"] for r, e in zip(results, entries)}
        costs = []
        for e in entries:
            if e.distiller == "BLOCKKD":
                c = cost_model(runner, e)
                c["measured_ratio_to_kd"] = measured[e.key]
                costs.append(c)
        echo("")
        if not costs:
            echo("cost model: no BLOCKKD entry to model")
        else:
            echo("cost model (forward pieces on the batch): cost(KD) = 3F(S) + F(T); "
                 "BLOCKKD adds 2F(teacher tail + head) + 3F(connector) per stone (expected value for sample:K)")
            echo(cost_table(costs))
        doc["cost_model"] = costs

    if getattr(args, "saved_tensors", False):
        saved = [{"teacher": e.teacher, "student": e.student, "distiller": e.distiller, "variant": e.variant,
                  "precision": e.precision, "parts": runner.saved_tensors(e)} for e in entries]
        echo("")
        echo(saved_table(saved))
        echo("(bytes of the tensors autograd saves for backward in one forward_train, by the part whose modules saved "
             "them; a storage saved twice counts once)")
        doc["saved_tensors"] = saved

    if args.profile > 0:
        profiles = []
        for e in entries:
            parts = runner.profile(e, args.profile)
            total = sum(parts.values())
            profiles.append({"teacher": e.teacher, "student": e.student, "distiller": e.distiller,
                             "variant": e.variant, "precision": e.precision, "profiled_ms": round(total, 3),
                             "parts_ms": {k: round(v, 3) for k, v in parts.items()}})
        echo("")
        echo(profile_table(profiles))
        echo(f"(torch.profiler over {args.profile} steps per entry: self CPU time of each part, ms per step and share "
             "of the profiled step; the profiler's overhead inflates small ops, so read shares and ratios)")
        doc["profile"] = profiles
    return doc


def check_options(args) -> None:
    """The numeric options' ranges (one :class:`ConfigError` naming the option)."""
    for name in ("batch_size", "num_classes", "image_size", "seq_len", "steps"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} is {getattr(args, name)}; it must be >= 1")
    if args.warmup < 0:
        raise ConfigError(f"--warmup is {args.warmup}; it must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads is {args.threads}; it must be >= 1")
    if not 0 <= args.seed < 2 ** 63 - 1:
        raise ConfigError(f"--seed is {args.seed}; it must be >= 0 and < 2**63 - 1")
    if args.profile < 0:
        raise ConfigError(f"--profile is {args.profile}; give a number of steps >= 1, or leave it out")
    budget = getattr(args, "budget_mib", None)
    if budget is not None:
        if not (budget > 0 and budget < float("inf")):
            raise ConfigError(f"--budget-mib is {budget}; give a memory budget in MiB > 0, e.g. 8192")
        if getattr(args, "memory", "isolated") == "off":
            raise ConfigError("--budget-mib needs the isolated memory figures; leave out --memory off")
        if args.batch_size < 2:
            raise ConfigError(f"--budget-mib measures at --batch-size and half of it; --batch-size is {args.batch_size}, "
                              "give at least 2")
