"""Errors the user sees as one clear line (never a traceback)."""


class StarlingError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits 1."""

    exit_code = 1


class UsageError(StarlingError):
    """The command was asked for something it cannot do as asked; exit 2."""

    exit_code = 2
