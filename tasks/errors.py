"""The failures a user can cause or fix (bad config, missing data, unreachable tracking, a
promotion that did not validate). The CLI prints these as one line and exits non-zero; anything
else is a bug and keeps its traceback."""


class ShrinkflowError(Exception):
    """Base class of the errors reported to the user as one line."""
