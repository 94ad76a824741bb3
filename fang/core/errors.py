"""One exception type for every user-facing problem (bad params, missing files, bad data).

The CLI turns it into a one-line message and exit code 2 instead of a traceback.
"""


class FangError(Exception):
    """A problem the user can fix: the message names what is wrong and where."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FangError(message)
