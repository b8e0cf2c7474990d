"""A study's runs as Slurm jobs, through submitit: submit, skip, resume, wait, list.

A *cell* is one run of a study grid (:class:`mdistiller_blockkd.cluster.local.Cell`); this module
uses only its ``name``, ``out_dir``, ``log_path``, ``epochs``, ``epochs_done()``,
``finished()``, ``command(resume)`` and ``shown()``.

Each cell is submitted as one Slurm job (or all of them as one job array, ``array=True``)
whose job runs the cell's train command, with ``--resume`` when the run folder holds a
``latest`` or ``latest_step`` checkpoint -- decided when the job starts, so a resubmitted or
requeued job continues its run. With more than one GPU per task the command runs under
torchrun, one process per GPU (:func:`launch_command`). The job asks Slurm for SIGUSR2
:data:`SIGNAL_DELAY_S` seconds before its time limit (submitit's ``--signal``); Slurm sends
it to every process of the job: the train process finishes its step, saves its position
(``latest_step``) and exits, while submitit requeues the job (at most 3 times for time
limits), which resumes from that step. A job cancelled (``scancel``, SIGTERM) or preempted
saves its step the same way; rerunning the study resumes it.

A submitted cell's job id is kept in a state file beside the cell's local log,
``<LOG.PREFIX>/<PROJECT>/logs/<name>.slurm.json``. A cell's state (:func:`run_states`):

* ``done``    -- the run is finished (``Cell.finished``: the last epoch's record and the final
  checkpoints are there), whatever its job is doing;
* ``queued``  -- its job waits: pending, requeued, held or suspended (``squeue``);
* ``running`` -- its job runs;
* ``failed``  -- its job has ended and the run is unfinished (its log says why);
* ``todo``    -- no job was submitted for it (an unfinished local run is ``todo`` too).

Running the study again (:func:`run_study`) skips ``done`` cells, leaves ``queued`` and
``running`` ones alone (and waits for them), and submits ``todo`` and ``failed`` ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ConfigError, Terminated, UserError
from ..utils.fileio import atomic_write_text
from ..utils.runfolder import resumable

__all__ = ["SlurmOptions", "TrainJob", "RunState", "SIGNAL_DELAY_S", "launch_command", "parse_time", "sbatch_parameters",
           "squeue_jobs", "run_states", "status_lines", "submit", "wait", "run_study", "INSTALL"]

#: seconds before the time limit at which a job gets SIGUSR2 (its train process saves its step then: time for
#: the step, an evaluation in progress and the checkpoint)
SIGNAL_DELAY_S = 120

#: how to install what ``--executor slurm`` needs
INSTALL = "pip install 'mdistiller_blockkd[cluster]'"

#: squeue states of a job that waits for its allocation (or was given it back)
QUEUED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
                    "SUSPENDED", "STOPPED"})
#: squeue states of a job that has ended (``squeue -t all`` lists them for MinJobAge seconds)
ENDED = frozenset({"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "REVOKED"})
#: sbatch options the study sets itself: the study's flag for each, or None where it keeps it
OWN_SBATCH = {"partition": "--partition", "time": "--time", "cpus-per-task": "--cpus-per-task",
              "gpus-per-task": "--gpus-per-task", "gpus-per-node": "--gpus-per-task", "gpus": "--gpus-per-task",
              "nodes": None, "ntasks": None, "ntasks-per-node": None, "mem": "--mem", "output": "--log-folder",
              "error": "--log-folder",
              "array": "--array and --jobs", "job-name": None, "open-mode": None, "signal": None}


def import_submitit():
    """submitit, or one error line naming the extra that installs it."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--executor slurm needs submitit, which is not installed; install the [cluster] extra: "
                        f"{INSTALL}") from None
    return submitit


# -- options ---------------------------------------------------------------------------------


def parse_time(text: str) -> int:
    """Minutes (rounded up) of a Slurm time limit: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ConfigError(f"--time is '{text}'; give minutes or Slurm's [D-]HH:MM:SS (e.g. 90, 4:00:00, 2-00:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        minutes, seconds = days * 1440 + a * 60 + (b or 0), c or 0
    elif c is not None:  # H:M:S
        minutes, seconds = a * 60 + b, c
    else:  # M[:S]
        minutes, seconds = a, b or 0
    total = minutes + math.ceil(seconds / 60)
    if total < 1:
        raise ConfigError(f"--time is '{text}'; a job needs at least one minute")
    return total


def parse_sbatch(items: Sequence[str]) -> Dict[str, object]:
    """``--sbatch`` values (``KEY=VALUE`` or ``KEY``, with or without leading dashes) as submitit's
    ``additional_parameters`` (a bare ``KEY`` is the flag ``--KEY``)."""
    extra: Dict[str, object] = {}
    for item in items:
        key, eq, value = str(item).lstrip("-").partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", key) or (eq and not value):
            raise ConfigError(f"--sbatch '{item}' is not an sbatch option; give its long name as KEY=VALUE or KEY "
                              "(e.g. --sbatch account=myproject --sbatch exclusive)")
        if key in OWN_SBATCH:
            how = f"use {OWN_SBATCH[key]}" if OWN_SBATCH[key] else "the study sets it itself"
            raise ConfigError(f"--sbatch '{item}': {how}")
        extra[key] = value if eq else True
    return extra


@dataclass
class SlurmOptions:
    """How the study's jobs ask Slurm for resources, and where their logs go."""

    time: Optional[str] = None  #: time limit per job (minutes or [D-]HH:MM:SS); needed to submit
    partition: Optional[str] = None
    cpus_per_task: int = 1
    gpus_per_task: int = 0  #: more than one runs torchrun with one process per GPU
    mem: Optional[str] = None  #: memory per job, Slurm's syntax (e.g. 32G)
    sbatch: Sequence[str] = ()  #: further sbatch options, KEY=VALUE or KEY
    log_folder: Optional[str] = None  #: submitit's folder (default: <the first run's log folder>/slurm)
    array: bool = False  #: one job array instead of a job per run
    parallel: Optional[int] = None  #: the array's limit of tasks running at once
    threads: int = 0  #: OMP threads of each train process (0: CPUs per task // processes)
    poll_s: float = 15.0  #: seconds between squeue checks while waiting

    def __post_init__(self):
        if self.time is not None:
            parse_time(self.time)
        for flag, value, low in (("--cpus-per-task", self.cpus_per_task, 1), ("--gpus-per-task", self.gpus_per_task, 0),
                                 ("--threads", self.threads, 0)):
            if value < low:
                raise ConfigError(f"{flag} is {value}; use {low} or more")
        if self.parallel is not None:
            if not self.array:
                raise ConfigError("--jobs limits the runs of a job array at once; add --array, or drop --jobs "
                                  "(separate jobs run as Slurm schedules them)")
            if self.parallel < 1:
                raise ConfigError(f"--jobs is {self.parallel}; use 1 or more")
        if self.mem is not None and not re.fullmatch(r"\d+[KMGT]?", str(self.mem)):
            raise ConfigError(f"--mem is '{self.mem}'; give Slurm's memory size, e.g. 16G or 16000 (megabytes)")
        if not self.poll_s > 0:
            raise ConfigError(f"--poll is {self.poll_s}; give a positive number of seconds")
        parse_sbatch(self.sbatch)

    def train_threads(self) -> int:
        return self.threads or max(1, self.cpus_per_task // max(1, self.gpus_per_task))


def sbatch_parameters(opts: SlurmOptions) -> Dict[str, object]:
    """submitit ``SlurmExecutor`` parameters for ``opts`` (one task per job; its stdout and stderr in one log)."""
    if opts.time is None:
        raise ConfigError("--executor slurm needs --time, each job's time limit (minutes or [D-]HH:MM:SS, e.g. "
                          "--time 4:00:00); a run that outlives it is requeued and resumes, at most 3 times")
    params: Dict[str, object] = dict(time=parse_time(opts.time), cpus_per_task=opts.cpus_per_task,
                                     ntasks_per_node=1, stderr_to_stdout=True, signal_delay_s=SIGNAL_DELAY_S,
                                     additional_parameters=parse_sbatch(opts.sbatch))
    if opts.partition:
        params["partition"] = opts.partition
    if opts.gpus_per_task:
        params["gpus_per_task"] = opts.gpus_per_task
    if opts.mem:
        params["mem"] = opts.mem
    if opts.parallel:
        params["array_parallelism"] = opts.parallel
    return params


# -- the job ----------------------------------------------------------------------------------


def launch_command(cmd: Sequence[str], gpus: int) -> List[str]:
    """The train command a job runs: as given for one GPU or none; for ``gpus`` > 1 under torchrun,
    ``python -m torch.distributed.run --standalone --nproc_per_node <gpus> -m mdistiller_blockkd train ...``
    (``torchrun`` of the same interpreter), one process per GPU of the allocation."""
    cmd = list(cmd)
    if gpus <= 1:
        return cmd
    if cmd[1:3] != ["-m", "mdistiller_blockkd"]:
        raise ValueError(f"not a 'python -m mdistiller_blockkd' command: {cmd[:4]}")
    return cmd[:1] + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)] + cmd[1:]


class TrainJob:
    """What a study's Slurm job runs: one cell's train command, from its ``latest`` checkpoint when the run
    folder holds one (``latest``, or ``latest_step`` beside it). submitit pickles it into the log folder;
    :meth:`checkpoint` lets it requeue the job."""

    def __init__(self, fresh: Sequence[str], resumed: Sequence[str], latest: str, cwd: str, env: Dict[str, str]):
        self.fresh, self.resumed = list(fresh), list(resumed)
        self.latest, self.cwd, self.env = latest, cwd, dict(env)

    def command(self) -> List[str]:
        return self.resumed if resumable(os.path.dirname(self.latest)) else self.fresh

    def __call__(self) -> int:
        cmd = self.command()
        print("$ " + shlex.join(cmd), flush=True)
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=dict(os.environ, **self.env))
        try:
            rc = proc.wait()
        except BaseException:
            # submitit's SIGUSR2 handler requeues the job and exits through here; the train process got the
            # signal too: let it save its step and end (Slurm ends it after KillWait at the latest)
            proc.wait()
            raise
        if rc:
            raise SystemExit(rc if rc > 0 else 128 - rc)  # the job's exit status; its log holds the error
        return 0

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on SIGUSR2 (the time limit is near, or preemption): requeue the same job."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def train_job(cell, opts: SlurmOptions) -> TrainJob:
    threads = str(opts.train_threads())
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    return TrainJob(launch_command(cell.command(False), opts.gpus_per_task),
                    launch_command(cell.command(True), opts.gpus_per_task),
                    os.path.abspath(os.path.join(cell.out_dir, "latest")), os.getcwd(), env)


# -- state --------------------------------------------------------------------------------------


def state_path(cell) -> str:
    """The file that keeps the cell's job id: ``<the cell's log without .log>.slurm.json``."""
    return os.path.splitext(cell.log_path)[0] + ".slurm.json"


def read_state(cell) -> Optional[dict]:
    path = state_path(cell)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the Slurm state file {path} ({e}); delete it once no job of "
                        f"{cell.name} is queued or running (squeue --me)") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), str) for k in ("job_id", "job_name", "log")):
        raise UserError(f"the Slurm state file {path} lacks job_id, job_name or log; delete it once no job of "
                        f"{cell.name} is queued or running (squeue --me)")
    return state


def write_state(cell, job_id: str, job_name: str, log: str) -> None:
    path = state_path(cell)
    state = {"job_id": job_id, "job_name": job_name, "log": log, "run": cell.name,
             "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_text(path, json.dumps(state, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"job {job_id} of {cell.name} was submitted but its state file {path} cannot be written "
                        f"({e}); free the space or fix the permissions, and cancel the job (scancel {job_id}) or "
                        "keep it in mind: a rerun would submit the run again") from None


def squeue_jobs() -> Dict[str, Tuple[str, str]]:
    """``{job id: (state, job name)}`` of this user's jobs that Slurm still knows (ended ones for MinJobAge);
    array tasks one by one (``<array id>_<index>``)."""
    cmd = ["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i|%T|%j"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("squeue is not on PATH: run the study where Slurm's client commands are installed") from None
    except subprocess.TimeoutExpired:
        raise UserError("squeue did not answer in 120 s; is the Slurm controller up? (sinfo)") from None
    if out.returncode:
        why = " ".join(out.stderr.split()) or f"exit status {out.returncode}"
        raise UserError(f"squeue failed: {why}; is the Slurm controller reachable? (sinfo)")
    jobs = {}
    for line in out.stdout.splitlines():
        job_id, _, rest = line.strip().partition("|")
        state, _, name = rest.partition("|")
        if job_id:
            jobs[job_id] = (state.split()[0] if state else "", name)
    return jobs


@dataclass
class RunState:
    """A cell's state (see the module's docstring) with its job id and log, when it was submitted."""

    cell: object
    state: str
    epochs_done: int
    job_id: Optional[str] = None
    log: Optional[str] = None
    slurm_state: Optional[str] = None  #: squeue's word for the job (RUNNING, CANCELLED, ...), when it still lists it

    @property
    def job_active(self) -> bool:
        """Whether Slurm still has the job queued or running (also once the run is done, while the job ends)."""
        return self.slurm_state is not None and self.slurm_state not in ENDED


def run_states(cells: Sequence) -> List[RunState]:
    """Each cell's :class:`RunState`; squeue is asked only when a cell has a job."""
    saved = [read_state(c) for c in cells]
    jobs = squeue_jobs() if any(saved) else {}
    rows = []
    for cell, state in zip(cells, saved):
        done, finished = cell.epochs_done(), cell.finished()
        if state is None:
            rows.append(RunState(cell, "done" if finished else "todo", done))
            continue
        found = jobs.get(state["job_id"])
        if found is not None and found[1] != state["job_name"]:
            found = None  # the id now names another job (a new controller counts from 1 again)
        slurm_state = found[0] if found else None
        if finished:
            word = "done"
        elif slurm_state is None or slurm_state in ENDED:
            word = "failed"
        else:
            word = "queued" if slurm_state in QUEUED else "running"
        rows.append(RunState(cell, word, done, state["job_id"], state["log"], slurm_state))
    return rows


def status_lines(cells: Sequence) -> List[str]:
    """``study --status``: a summary line, then one line per run: state, name, epochs, job and log."""
    rows = run_states(cells)
    counts = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    order = ["done", "running", "queued", "failed", "todo"]
    lines = [f"study: {len(rows)} runs: " + ", ".join(f"{counts[s]} {s}" for s in order if s in counts)]
    width = max(len(r.cell.name) for r in rows)
    for r in rows:
        line = f"{r.state:<8} {r.cell.name:<{width}}  {r.epochs_done}/{r.cell.epochs} epochs"
        if r.job_id:
            line += f"  job {r.job_id}" + (f" ({r.slurm_state})" if r.slurm_state and r.state == "failed" else "")
            line += f"  log {r.log}"
        lines.append(line)
    return lines


# -- submit and wait ----------------------------------------------------------------------------


def submit(cells: Sequence, opts: SlurmOptions, echo: Callable[[str], None] = print) -> None:
    """Submit one job per cell (or one array for all, ``opts.array``) and write each cell's state file."""
    submitit = import_submitit()
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    params = sbatch_parameters(opts)
    folder = os.path.abspath(opts.log_folder or os.path.join(os.path.dirname(cells[0].log_path), "slurm"))
    try:
        os.makedirs(folder, exist_ok=True)
        executor = submitit.SlurmExecutor(folder=folder)
    except OSError as e:
        raise UserError(f"cannot create the Slurm log folder {folder} ({e}); give a writable --log-folder") from None
    except RuntimeError:  # submitit finds no srun
        raise UserError("srun is not on PATH: --executor slurm runs where Slurm's commands are installed "
                        "(a login node of the cluster)") from None
    executor.update_parameters(**params)

    def record(cell, job, name):
        log = str(job.paths.stdout)
        write_state(cell, str(job.job_id), name, log)
        echo(f"[submitted] {cell.name}: job {job.job_id} (log {log})")

    try:
        if opts.array:
            name = f"study:{cells[0].name}+{len(cells) - 1}"
            executor.update_parameters(job_name=name)
            with executor.batch():
                jobs = [executor.submit(train_job(c, opts)) for c in cells]
            for cell, job in zip(cells, jobs):
                record(cell, job, name)
        else:
            for cell in cells:
                name = f"study:{cell.name}"
                executor.update_parameters(job_name=name)
                record(cell, executor.submit(train_job(cell, opts)), name)
    except (FailedJobError, FailedSubmissionError) as e:
        why = " ".join(str(e).split())
        raise UserError(f"sbatch refused the job: {why}; check --partition, --time, --cpus-per-task, --gpus-per-task, "
                        f"--mem and --sbatch against the cluster (sinfo)") from None
    except OSError as e:
        raise UserError(f"cannot submit through the log folder {folder} ({e}); give a writable --log-folder") from None


def _progress(r: RunState) -> str:
    epochs = f"epoch {r.epochs_done}/{r.cell.epochs}"
    if r.state == "done":
        return f"[ok]        {r.cell.name} ({epochs})"
    if r.state == "failed":
        why = f" ({r.slurm_state})" if r.slurm_state else ""
        return f"[FAILED]    {r.cell.name}: job {r.job_id} ended{why} at {epochs}; see {r.log}"
    return f"[{r.state}]{' ' * (10 - len(r.state))}{r.cell.name}: job {r.job_id}, {epochs}"


def wait(cells: Sequence, poll_s: float, echo: Callable[[str], None] = print) -> List[RunState]:
    """Poll until no cell's job is queued or running, printing each change of state or epoch; return the states."""
    start, shown = time.time(), None
    try:
        while True:
            rows = run_states(cells)
            if shown is None:  # runs finished before: run_study named them
                shown = {r.cell.name: (r.state, r.epochs_done, r.job_id) for r in rows if r.state == "done"}
            for r in rows:
                key = (r.state, r.epochs_done, r.job_id)
                if r.job_id and shown.get(r.cell.name) != key:
                    shown[r.cell.name] = key
                    echo(f"{_progress(r)}  [{time.time() - start:.0f}s]")
            if not any(r.job_active for r in rows):
                return rows
            time.sleep(poll_s)
    except (KeyboardInterrupt, Terminated):
        echo("stopped waiting; the jobs go on: the same command with --status lists them, scancel stops them")
        raise


def run_study(cells: Sequence, opts: SlurmOptions, wait_for_jobs: bool = True, dry_run: bool = False,
              echo: Callable[[str], None] = print) -> None:
    """Run the study on Slurm: skip done cells, leave queued and running ones alone, submit the others,
    then (``wait_for_jobs``) wait for all; a :class:`UserError` names the runs that did not finish."""
    if not dry_run:
        sbatch_parameters(opts)  # --time and the rest checked before anything is asked of Slurm
    rows = run_states(cells)
    todo = []
    for r in rows:
        c = r.cell
        if r.state == "done":
            echo(f"[done]      {c.name} ({r.epochs_done}/{c.epochs} epochs)")
        elif r.state in ("queued", "running"):
            echo(f"[{r.state}]{' ' * (10 - len(r.state))}{c.name}: job {r.job_id} (not submitted again; log {r.log})")
        else:
            resume = resumable(c.out_dir)
            echo(f"[{'resume' if resume else 'todo'}]{'    ' if resume else '      '}{c.shown()}"
                 + (f"  (job {r.job_id} ended: {r.slurm_state or 'gone from squeue'}; log {r.log})"
                    if r.state == "failed" else ""))
            todo.append(c)
    if dry_run:
        return
    if todo:
        submit(todo, opts, echo)
    if not wait_for_jobs:
        echo("not waiting (--no-wait): the same command with --status lists the runs' states")
        return
    failed = [r for r in wait(cells, opts.poll_s, echo) if r.state != "done"]
    if failed:
        raise UserError(f"{len(failed)} run(s) did not finish: "
                        + ", ".join(f"{r.cell.name} (log {r.log})" for r in failed)
                        + "; rerun the same command to resume them")
