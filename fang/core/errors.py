"""One exception type for every user-facing problem (bad params, missing files, bad data).

The CLI turns it into a one-line message and exit code 2 instead of a traceback.
"""


class FangError(Exception):
    """A problem the user can fix: the message names what is wrong and where."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise FangError(message)


def require_label(value: object, what: str) -> str:
    """`value` as a name that becomes one path component (a calibration source, a topic); else one clear line.

    `--source ..` used to write artifacts/bias/../allocate.json, i.e. over the main pipeline's
    artifacts: a name must not be empty, '.' or '..', nor hold a path separator.
    """
    ok = isinstance(value, str) and value.strip() != "" and value not in (".", "..") \
        and not any(c in value for c in "/\\\0")
    require(ok, f"{what} {value!r} is not a name: it must be non-empty, not '.' or '..', with no '/' or '\\'")
    return value  # type: ignore[return-value]
