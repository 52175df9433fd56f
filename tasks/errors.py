"""The failures a user can cause or fix (bad config, missing data, unreachable tracking, a
promotion that did not validate). The CLI prints these as one line and exits non-zero; anything
else is a bug and keeps its traceback."""


class ShrinkflowError(Exception):
    """Base class of the errors reported to the user as one line."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """What a one-line error quotes of another library's exception: the first line of its message,
    at most ``limit`` characters (its type's name when it has no message)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def named_first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (``Type`` alone when it has none)."""
    text = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
