"""User-facing errors: the CLI prints their message on one line and exits 2."""


class DeepLSPError(Exception):
    """Bad input or an unusable environment, explained in one line for the user."""


class UnknownNameError(DeepLSPError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line user errors."""
    import re

    for line in str(exc).splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()  # torch colours some messages
        if line:
            return line
    return type(exc).__name__
