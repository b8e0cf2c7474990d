"""Run a grid of training runs (configs x seeds) in parallel worker processes or as Slurm jobs, resumably.

    mdistiller-blockkd-study --cfg 'fmnist/study/res56_res20/*' --seeds 0 1 2 --jobs 2 [-- KEY VALUE ...]

(also ``python -m mdistiller_blockkd study ...`` and, in a checkout, ``python tools/study.py
--cfg configs/fmnist/study/res56_res20/*.yaml ...``). ``--cfg`` takes files, shipped
configs' short names, and glob patterns of either (a pattern the shell did not expand is
matched here, against the working directory, then against the shipped configs).

Each cell is one train process::

    python -m mdistiller_blockkd train --cfg <CFG> EXPERIMENT.SEED <s> EXPERIMENT.NAME <NAME>_s<s> [KEY VALUE ...]

(without ``--seeds`` the config's own seed and name are kept), so any cell of a study
can be rerun alone with the command this tool prints. Cells run seed-major (every config
with the first seed, then the next seed), so an interrupted study holds whole seeds. A
finished cell is skipped: its ``metrics.jsonl`` has the last epoch's record and its final
checkpoints exist (``latest``, ``student_latest``, ``ckpt_epoch_<N>.pth``; see
``mdistiller_blockkd.utils.runfolder``). One with a ``latest`` checkpoint, or a mid-epoch
``latest_step``, is continued with ``--resume``; rerunning the same command finishes a killed
study and loses at most the epoch each worker was in (the steps since the last
``LOG.SAVE_EVERY_STEPS`` checkpoint with that option; nothing for a cell stopped by SIGTERM,
which saves its step).

SIGTERM or Ctrl-C (SIGINT) to the study is passed on to every running cell (each runs in
its own session, so a terminal's Ctrl-C reaches it once, through the study; a cell saves its
step on SIGTERM), and the study waits for them to stop (a second Ctrl-C kills them) before it exits; rerun the same command
to resume them.

Every worker gets ``--threads`` intra-op threads (``OMP_NUM_THREADS``; default: the CPU
count divided by ``--jobs``). Its output goes to ``<LOG.PREFIX>/<PROJECT>/logs/<name>.log``.
A failed cell does not stop the others; the tool exits non-zero at the end and names it.
Summarise the finished study with the report command (``mdistiller-blockkd-report``).

On Slurm (``--executor slurm``; the ``[cluster]`` extra, submitit) each cell is one Slurm job
(``--array``: all cells one job array, ``--jobs`` of them at once)::

    mdistiller-blockkd-study --executor slurm --time 12:00:00 --partition gpu --cpus-per-task 8 \
        --gpus-per-task 1 --mem 32G [--sbatch KEY=VALUE ...] [--log-folder DIR] [--no-wait] --cfg ... --seeds ...

The job runs the cell's train command (with ``--resume`` when its run folder holds
``latest``; under torchrun, one process per GPU, when ``--gpus-per-task`` is above 1) and
logs to ``<log folder>/<job id>_0_log.out``. The command waits and prints each run's
progress; ``--no-wait`` returns once the jobs are submitted. Rerunning it skips finished
cells, leaves cells whose job is queued or running alone (the job id is kept in
``<LOG.PREFIX>/<PROJECT>/logs/<name>.slurm.json``, squeue says whether it still waits or
runs) and submits the others again. ``--status`` (same command line) lists every cell as
done, running, queued, failed (with its job's log) or todo. The library side is
:mod:`mdistiller_blockkd.cluster.slurm`.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..cluster import slurm
from ..errors import ConfigError, Terminated, UserError, run_cli
from ..utils.runfolder import recorded_epoch, resumable, run_finished


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
    from ..engine.trainer import output_dir

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
        todo.append((c, resume))
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
            c, resume = pending.pop(0)
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="mdistiller-blockkd-study",
        description="Run configs x seeds as parallel train processes or Slurm jobs; skips finished runs and "
                    "resumes killed ones.",
        epilog="Example: mdistiller-blockkd-study --cfg 'fmnist/study/res56_res20/*' --seeds 0 1 2 --jobs 2",
    )
    p.add_argument("--cfg", nargs="+", required=True, metavar="FILE",
                   help="YAML configs (files, shipped short names, or glob patterns of either), one grid row each")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S",
                   help="EXPERIMENT.SEED values; each run is named <NAME>_s<S> (default: the config's own seed and name)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at once (default 1); with --executor slurm --array: the array's runs at once")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP_NUM_THREADS of each run (default: CPU count // jobs, at least 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (and which cells are done) and stop")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: worker processes here (default); slurm: one Slurm job per run, through submitit")
    p.add_argument("--status", action="store_true",
                   help="list each run's state (done, running, queued, failed with its log, todo) and stop; "
                        "the other options of the command line are not used")
    s = p.add_argument_group("Slurm (--executor slurm; needs the [cluster] extra)")
    s.add_argument("--time", help="each job's time limit, minutes or [D-]HH:MM:SS (required to submit)")
    s.add_argument("--partition", help="Slurm partition (default: the cluster's default)")
    s.add_argument("--cpus-per-task", type=int, help="CPUs of each job (default 1)")
    s.add_argument("--gpus-per-task", type=int,
                   help="GPUs of each job (default 0); more than 1 runs torchrun with one process per GPU")
    s.add_argument("--mem", help="memory of each job, e.g. 32G (default: the cluster's)")
    s.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="another sbatch option, repeatable: --sbatch account=myproject --sbatch exclusive")
    s.add_argument("--log-folder",
                   help="the jobs' logs and submitit's files (default: <LOG.PREFIX>/<PROJECT>/logs/slurm)")
    s.add_argument("--array", action="store_true", help="submit the runs as one job array (--jobs: at most N at once)")
    s.add_argument("--no-wait", action="store_true", help="submit and return (default: wait, showing progress)")
    s.add_argument("--poll", type=float, help="seconds between squeue checks while waiting (default 15)")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE",
                   help="overrides for every run, after '--' (e.g. -- SOLVER.EPOCHS 2)")
    return p.parse_args(argv)


SLURM_ONLY = ("time", "partition", "cpus_per_task", "gpus_per_task", "mem", "sbatch", "log_folder", "array", "no_wait",
              "poll")


def slurm_options(args) -> Optional[slurm.SlurmOptions]:
    """``--executor slurm``'s options; None for the local executor, which takes none of them."""
    if args.executor == "local" or args.status:
        given = [f"--{k.replace('_', '-')}" for k in SLURM_ONLY if getattr(args, k) not in (None, False)]
        if given and not args.status:
            raise ConfigError(f"{given[0]} is an option of --executor slurm; add --executor slurm or drop it")
        return None
    return slurm.SlurmOptions(
        time=args.time, partition=args.partition,
        cpus_per_task=1 if args.cpus_per_task is None else args.cpus_per_task, gpus_per_task=args.gpus_per_task or 0,
        mem=args.mem, sbatch=args.sbatch or (), log_folder=args.log_folder, array=args.array, parallel=args.jobs,
        threads=args.threads, poll_s=15.0 if args.poll is None else args.poll)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = 1 if args.jobs is None else args.jobs
    if jobs < 1:
        raise ConfigError(f"--jobs is {jobs}; use 1 or more")
    if args.threads < 0:
        raise ConfigError(f"--threads is {args.threads}; use 0 (CPU count // jobs) or more")
    if len(args.opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(args.opts)}")
    on_slurm = slurm_options(args)
    cells = plan(expand_configs(args.cfg), args.seeds, args.opts)
    if args.status:
        print("\n".join(slurm.status_lines(cells)), flush=True)
        return 0
    if on_slurm is not None:
        print(f"study: {len(cells)} runs as Slurm jobs", flush=True)
        slurm.run_study(cells, on_slurm, wait_for_jobs=not args.no_wait, dry_run=args.dry_run,
                        echo=lambda m: print(m, flush=True))
        return 0
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    print(f"study: {len(cells)} runs, {jobs} at once, {threads} thread(s) each", flush=True)
    failed = run_cells(cells, jobs, threads, dry_run=args.dry_run, echo=lambda m: print(m, flush=True))
    if failed:
        raise UserError(f"{len(failed)} run(s) failed: " + ", ".join(f"{c.name} (log {c.log_path})" for c in failed))
    return 0


def cli(argv=None) -> int:
    """Console-script entry point: :func:`main` with one ``error:`` line for a user error."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
