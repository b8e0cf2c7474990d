"""User-facing errors.

Every error a user can cause (bad config key, unknown model, missing checkpoint or
dataset, NaN loss, ...) is raised as a :class:`UserError` whose message names the bad
value and the fix. The command-line tools print it as a single line and exit with a
non-zero status instead of showing a traceback.
"""

import contextlib
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


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)`` as a command: return its exit status, or exit with one line for a user error.

    The status is ``main``'s result when it is an ``int``, else 0. A
    :class:`UserError` prints ``error: <message>`` on stderr and exits with its
    ``exit_code``; Ctrl-C prints ``interrupted`` and exits with 130; SIGTERM unwinds as
    :class:`Terminated` (:func:`sigterm_raises`), prints ``terminated`` and exits with 143.
    Every command of the package (``mdistiller_blockkd.cli.*``) runs through this function.
    """
    try:
        with sigterm_raises():
            result = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated as e:
        print("terminated", file=sys.stderr)
        sys.exit(128 + e.signum)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
