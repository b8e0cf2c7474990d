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


def run_cli(main):
    """Run ``main()`` and turn a :class:`UserError` into one line on stderr + exit code."""
    import sys

    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
