"""User-facing errors: each names the bad value and the fix. The CLI prints them without a traceback."""


class KvrankError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""
