"""User-facing errors: the CLI prints their message on one line and exits 2."""


class DeepLSPError(Exception):
    """Bad input or an unusable environment, explained in one line for the user."""


class UnknownNameError(DeepLSPError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
