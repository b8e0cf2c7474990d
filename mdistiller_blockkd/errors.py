"""User-facing errors.

Every error a user can cause (bad config key, unknown model, missing checkpoint or
dataset, NaN loss, ...) is raised as a :class:`UserError` whose message names the bad
value and the fix. The command-line tools print it as a single line and exit with a
non-zero status instead of showing a traceback.
"""


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


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)`` as a command: return its exit status, or exit with one line for a user error.

    The status is ``main``'s result when it is an ``int``, else 0. A
    :class:`UserError` prints ``error: <message>`` on stderr and exits with its
    ``exit_code``; Ctrl-C prints ``interrupted`` and exits with 130. Every command of the
    package (``mdistiller_blockkd.cli.*``) runs through this function.
    """
    import sys

    try:
        result = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
