"""User-facing errors.

Anything the user can fix (a wrong path, a corrupt file, an unknown option) raises
``VitqcError`` with a one-line message naming the file or option. The CLI prints the
message without a traceback and exits with status 2.
"""


class VitqcError(Exception):
    """An error caused by the user's input, reported as one line."""
