"""User-facing errors: each names the bad value and the fix. The CLI prints them without a traceback."""

from __future__ import annotations


class KvrankError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it.

    The message speaks the library's words: it names a Python argument or config field (`kv_format`, `k`,
    `store_dir`), never a command-line flag. `param` is that name when one argument is at fault; each face
    translates it to its own: the CLI to its option (`kv_format` -> `--kv-format`), the API to its JSON
    error's `param`. Pickles whole (`param` included), as Ray ships errors between processes.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
