"""User-facing errors.

Every error a user can cause (bad config key, unknown model, missing checkpoint or
dataset, NaN loss, ...) is raised as a :class:`UserError` whose message names the bad
value and the fix. The command-line tools print it as a single line and exit with a
non-zero status instead of showing a traceback.

The storage the user points a command at fails in ways no code can prevent (a full disk,
a read-only folder, a name too long for the file system): :func:`run_cli` prints such
an ``OSError`` as one line too, naming the path and the error in words
(:func:`describe_os_error`). Other exceptions -- programming errors -- keep their traceback.
"""

import contextlib
import errno
import os
import signal
import sys
import threading


class UserError(Exception):
    """An error caused by the user's input; its message says what to do."""

    exit_code = 2


class ConfigError(UserError):
    """Bad configuration value or key."""


class CheckpointError(UserError):
    """Missing, corrupt or mismatching checkpoint."""


class DatasetError(UserError):
    """Dataset missing or malformed."""


class TrainingError(UserError):
    """Training diverged (non-finite loss) or cannot proceed."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM received by a command (see :func:`run_cli`): unwinds like ``KeyboardInterrupt``, so
    ``finally`` blocks run (temporary files removed, locks released, child processes stopped)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: Exit status of a run that stopped on a signal after saving its exact position (:class:`Preempted`):
#: sysexits' ``EX_TEMPFAIL``, "try again later" -- run the same command with ``--resume``.
PREEMPTED_EXIT = 75

#: Signals that ask a training run to stop at the next step and save its position: SIGTERM (``kill``,
#: ``scancel``, preemption), SIGUSR1 (``sbatch --signal=USR1@<seconds>``), SIGUSR2 (submitit's).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(BaseException):
    """A run stopped on a stop signal after saving where it was; :func:`run_cli` exits with
    :data:`PREEMPTED_EXIT`. A ``BaseException``, like :class:`Terminated`, so that no ``except
    Exception`` mistakes it for a failure."""


class StopRequest:
    """The first of :data:`STOP_SIGNALS` a process got inside :func:`stop_signals_deferred` (``signum``, else None)."""

    def __init__(self):
        self.signum = None
        self.raised = False


@contextlib.contextmanager
def stop_signals_deferred():
    """While the block runs in the main thread, the first of :data:`STOP_SIGNALS` only sets the
    yielded :class:`StopRequest`'s ``signum`` (the trainer polls it between steps); a second one raises
    :class:`Terminated` once, as SIGTERM does under :func:`run_cli`. Processes forked inside the block
    (data-loader workers) ignore them: Slurm signals every process of a job, and their parent stops
    them when it ends. The previous handlers are restored at the end.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked loader worker: keep serving batches until the parent stops it
            return
        if request.signum is None:
            request.signum = signum
        elif not request.raised:
            request.raised = True
            raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs in the main thread, SIGTERM raises :class:`Terminated` once in this process.

    A repeated SIGTERM is ignored while the first one unwinds; a process forked inside the
    block (a data-loader worker) keeps SIGTERM's default action. The previous handler is
    restored at the end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid, raised = os.getpid(), []

    def handler(signum, frame):
        if os.getpid() != pid:  # a forked child: die as SIGTERM would have made it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if not raised:
            raised.append(signum)
            raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: errno values of an ``OSError`` that the user's storage caused, with the fix to suggest.
_STORAGE_ERRNOS = {
    errno.ENOSPC: "free some space, or write somewhere else",
    errno.EDQUOT: "free some space (disk quota), or write somewhere else",
    errno.EFBIG: "the file is larger than this file system allows; write somewhere else",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "check the permissions, or choose another folder",
    errno.EPERM: "check the permissions, or choose another folder",
    errno.ENAMETOOLONG: "use a shorter name (EXPERIMENT.NAME, LOG.PREFIX or the path given)",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.EEXIST: "a file of that name is in the way; move it or choose another path",
    errno.ELOOP: "the path has a symbolic-link loop; choose another path",
    errno.EIO: "the storage reported an input/output error; check the disk or choose another folder",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or lower DATASET.NUM_WORKERS",
    errno.ENFILE: "too many open files on the system; raise the limit or lower DATASET.NUM_WORKERS",
}


def describe_os_error(e: BaseException):
    """One line for an ``OSError`` caused by the user's storage (full, read-only, name too
    long, ...): ``'<path>': <the errno in words> (<ERRNO>); <fix>`` (``writing failed: ...``
    when the error names no file, e.g. a full disk under the standard output). ``None`` for
    any other exception, and for an ``OSError`` with another errno (those are bugs)."""
    if not isinstance(e, OSError) or e.errno not in _STORAGE_ERRNOS:
        return None
    path = e.filename2 if e.filename2 is not None else e.filename  # a rename's destination
    where = "writing failed" if path is None else f"'{os.fsdecode(path)}'"
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{where}: {os.strerror(e.errno)} ({name}); {_STORAGE_ERRNOS[e.errno]}"


def describe_out_of_memory(e: BaseException):
    """One line for running out of memory (``MemoryError``, torch's ``OutOfMemoryError``, or
    its CPU allocator's failure); ``None`` for any other exception."""
    text = " ".join(str(e).split())
    if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or (isinstance(e, RuntimeError) and "can't allocate memory" in text)):
        return None
    detail = text[:160] + ("..." if len(text) > 160 else "")
    return (f"out of memory ({type(e).__name__}: {detail}); lower the batch size (SOLVER.BATCH_SIZE, "
            "DATASET.TEST.BATCH_SIZE, --batch-size) or the image size, or use a machine with more memory")


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)`` as a command: return its exit status, or exit with one line for a user error.

    The status is ``main``'s result when it is an ``int``, else 0. A
    :class:`UserError` prints ``error: <message>`` on stderr and exits with its
    ``exit_code``, and so does (with status 2) an ``OSError`` of the user's storage
    (:func:`describe_os_error`) and running out of memory (:func:`describe_out_of_memory`);
    Ctrl-C prints ``interrupted`` and exits with 130; SIGTERM unwinds as
    :class:`Terminated` (:func:`sigterm_raises`), prints ``terminated`` and exits with 143; a
    training run stopped by a signal after saving its position (:class:`Preempted`) prints
    ``preempted`` and exits with :data:`PREEMPTED_EXIT` (75).
    Every command of the package (``mdistiller_blockkd.cli.*``) runs through this function.
    """
    try:
        with sigterm_raises():
            result = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (OSError, MemoryError, RuntimeError) as e:
        line = describe_os_error(e) or describe_out_of_memory(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as e:
        print("terminated", file=sys.stderr)
        sys.exit(128 + e.signum)
    except Preempted:
        print("preempted", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
