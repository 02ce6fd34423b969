"""One exception type for every user-facing failure.

Anything raised as ``SoapError`` is a problem with the user's input or environment
(a bad path, a store with the wrong shape, an unknown name); the CLI prints its
message on one line instead of a traceback.
"""


class SoapError(ValueError):
    """A user-facing error whose message names the bad input."""
