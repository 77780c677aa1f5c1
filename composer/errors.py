"""User-facing errors: the CLI prints the message and exits with `exit_code`, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad spec, missing data, wrong checkpoint...)."""

    exit_code = 2


class SpecFieldError(UserError):
    """A user mistake found at run time that one field of the spec can fix (the data has other
    classes, the batch is larger than the data...): `field` is its path ("model.num_classes",
    "model.blocks[2].heads"), which `train` turns into the file, line and column it came from."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def located(self, where: str | None) -> UserError:
        return UserError(f"{where}: {self}") if where else self


def first_few(items: list[str], limit: int, sep: str) -> str:
    """The first `limit` of `items` joined by `sep`, then how many more there are: a long list of
    problems in a message stays readable."""
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return sep.join(items[:limit] + more)
