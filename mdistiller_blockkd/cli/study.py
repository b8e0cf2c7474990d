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
``latest_step``, is continued with ``--resume``. Local workers look again when a cell's turn
comes, so a cell run by hand while the study waited is skipped once it is finished.
Rerunning the same command finishes a killed study and loses at most the epoch each worker was in (the steps since the last
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
:mod:`mdistiller_blockkd.cluster.local` (the grid, local workers) and :mod:`mdistiller_blockkd.cluster.slurm`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from ..cluster import slurm
from ..cluster.local import expand_configs, plan, run_cells
from ..errors import ConfigError, UserError, run_cli


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
