"""The one exception type for bad input: the CLI prints its message as a single `error:` line."""


class LoomError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""
