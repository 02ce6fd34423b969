"""One exception type for every user-facing failure.

Anything raised as ``SoapError`` is a problem with the user's input or environment
(a bad path, a store with the wrong shape, an unknown name); the CLI prints its
message on one line instead of a traceback.
"""


class SoapError(ValueError):
    """A user-facing error whose message names the bad input."""


def json_object(text: str, what: str) -> dict:
    """``text`` parsed as a JSON object; anything else is a ``SoapError`` naming ``what``
    (the option or variable it came from)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SoapError(f"{what} is not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SoapError(f"{what} must be a JSON object, got {text!r}")
    return value
