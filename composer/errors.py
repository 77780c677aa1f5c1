"""User-facing errors: the CLI prints the message and exits with `exit_code`, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing data, wrong checkpoint...)."""

    exit_code = 2
