"""Exceptions shared by the command-line tools."""


class UsageError(ValueError):
    """A bad command-line value, found after parsing: the CLI prints it as one line, exit status 2."""
