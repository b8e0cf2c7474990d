"""A study's grid (configs x seeds) as train-command processes, run here in parallel workers, resumably.

A *cell* (:class:`Cell`) is one run of the grid: one train command
(``python -m mdistiller_blockkd train --cfg <CFG> [--resume] [KEY VALUE ...]``).
:func:`plan` makes the cells in run order (seed-major), :func:`run_cells` runs the unfinished
ones in worker processes (passing SIGTERM / Ctrl-C on to them), :func:`expand_configs`
resolves ``--cfg``'s files, short names and patterns. The study command
(:mod:`mdistiller_blockkd.cli.study`) documents the behaviour; :mod:`.slurm` runs the same
cells as Slurm jobs. Imports no trainer: a cell is a process.
"""

from __future__ import annotations

import glob
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..errors import ConfigError, Terminated
from ..utils.runfolder import output_dir, recorded_epoch, resumable, run_finished


@dataclass
class Cell:
    """One run of the grid: a config, an optional seed and the overrides that name it."""

    cfg_path: str
    seed: Optional[int]
    name: str
    out_dir: str
    log_path: str
    epochs: int
    opts: List[str]

    def command(self, resume: bool = False) -> List[str]:
        cmd = [sys.executable, "-m", "mdistiller_blockkd", "train", "--cfg", self.cfg_path]
        return cmd + (["--resume"] if resume else []) + self.opts

    def shown(self) -> str:
        """The command as a user would type it (relative paths)."""
        rel = os.path.relpath(self.cfg_path) if os.path.isabs(self.cfg_path) else self.cfg_path
        return " ".join(shlex.quote(t) for t in ["mdistiller-blockkd-train", "--cfg", rel] + self.opts)

    def epochs_done(self) -> int:
        """The last epoch recorded in the cell's ``metrics.jsonl`` (0 when none)."""
        return recorded_epoch(self.out_dir)

    def finished(self) -> bool:
        """Whether the cell's run is finished: its last epoch's record and its final checkpoints are there."""
        return run_finished(self.out_dir, self.epochs)


def plan(cfg_paths: Sequence[str], seeds: Optional[Sequence[int]], overrides: Sequence[str]) -> List[Cell]:
    """Cells in run order: seed-major, configs in the order given. Configs are validated here."""
    from ..config import load_cfg

    cells: List[Cell] = []
    names = {}
    for seed in (list(seeds) if seeds else [None]):
        for path in cfg_paths:
            base = load_cfg(path, list(overrides))
            name = str(base.EXPERIMENT.NAME or base.EXPERIMENT.TAG)
            opts = list(overrides)
            if seed is not None:
                name = f"{name}_s{seed}"
                opts += ["EXPERIMENT.SEED", str(seed), "EXPERIMENT.NAME", name]
            cfg = load_cfg(path, opts)
            out = output_dir(cfg)
            if out in names:
                raise ConfigError(f"{path} and {names[out]} write the same run directory {out}; "
                                  "give them different EXPERIMENT.NAME values")
            names[out] = path
            log = os.path.join(str(cfg.LOG.PREFIX), str(cfg.EXPERIMENT.PROJECT), "logs", f"{name}.log")
            cells.append(Cell(path, seed, name, out, log, int(cfg.SOLVER.EPOCHS), opts))
    return cells


def run_cells(cells: Sequence[Cell], jobs: int, threads: int, dry_run: bool = False, echo=print) -> List[Cell]:
    """Run the cells, at most ``jobs`` at once; return the failed ones."""
    todo = []
    for c in cells:
        if c.finished():
            echo(f"[done]    {c.name} ({c.epochs_done()}/{c.epochs} epochs)")
            continue
        resume = resumable(c.out_dir)
        todo.append(c)
        echo(f"[{'resume' if resume else 'todo'}]{'  ' if resume else '    '}{c.shown()}")
    if dry_run or not todo:
        return []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    running, failed = [], []
    try:
        _run(todo, jobs, env, running, failed, echo)
    except (KeyboardInterrupt, Terminated) as e:
        _stop(running, signal.SIGINT if isinstance(e, KeyboardInterrupt) else e.signum, echo)
        raise
    return failed


def _run(todo, jobs: int, env: dict, running: list, failed: list, echo) -> None:
    start = time.time()
    pending = list(todo)
    while pending or running:
        while pending and len(running) < jobs:
            c = pending.pop(0)
            # the state again at launch (whether to skip or resume): a run started by hand while the
            # study waited may be done by now
            if c.finished():
                echo(f"[done]    {c.name} ({c.epochs_done()}/{c.epochs} epochs, finished since the plan)")
                continue
            resume = resumable(c.out_dir)
            os.makedirs(os.path.dirname(c.log_path), exist_ok=True)
            fh = open(c.log_path, "a")
            fh.write(f"\n$ {' '.join(shlex.quote(t) for t in c.command(resume))}\n")
            fh.flush()
            # own session: a terminal's Ctrl-C reaches the cell only through the study (see _stop)
            proc = subprocess.Popen(c.command(resume), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
                                    start_new_session=True)
            running.append((c, proc, fh, time.time()))
            echo(f"[start]   {c.name} (log {c.log_path})")
        time.sleep(0.5)
        for item in list(running):
            c, proc, fh, t0 = item
            rc = proc.poll()
            if rc is None:
                continue
            fh.close()
            running.remove(item)
            left = len(pending) + len(running)
            if rc == 0:
                echo(f"[ok]      {c.name} in {time.time() - t0:.0f}s ({left} left, {time.time() - start:.0f}s so far)")
            else:
                failed.append(c)
                echo(f"[FAILED]  {c.name}: exit status {rc}; see {c.log_path}")


def _stop(running: list, signum: int, echo) -> None:
    """Send ``signum`` to every running cell and wait for them; a second Ctrl-C kills those left."""
    for _, proc, _, _ in running:
        if proc.poll() is None:
            proc.send_signal(signum)
    echo(f"[stop]    {signal.Signals(signum).name} passed on to {len(running)} running cell(s); waiting for them "
         "(Ctrl-C again kills them)")
    for c, proc, fh, _ in running:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                for _, other, _, _ in running:
                    if other.poll() is None:
                        other.kill()
        fh.close()
        echo(f"[stopped] {c.name} (exit status {rc}); rerun the same command to resume it")


def expand_configs(names: Sequence[str]) -> List[str]:
    """Config files for ``--cfg``: files and short names as given (resolved), glob patterns expanded
    (against the working directory, else against the shipped configs), in order."""
    from ..config import config_dir, resolve_config

    out: List[str] = []
    for name in names:
        if os.path.isfile(name) or not glob.has_magic(name):
            found = [resolve_config(name)]
        else:
            found = sorted(glob.glob(name))
            root = config_dir()
            if not found and root is not None:
                short = name[len("configs/"):] if name.startswith("configs/") else name
                pattern = short if short.endswith((".yaml", ".yml")) else short + ".yaml"
                found = sorted(glob.glob(os.path.join(root, pattern)))
            if not found:
                raise ConfigError(f"--cfg pattern '{name}' matches no config file; give files or shipped configs' "
                                  "short names (list them with: python -m mdistiller_blockkd configs)")
        out += found
    return out
