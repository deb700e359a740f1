"""The one exception type that users can cause, and the one that marks a cancelled run."""


class OpenSegError(ValueError):
    """A problem with the user's input or files; the message says what to do about it."""


class Cancelled(RuntimeError):
    """Raised inside a worker when the user cancelled a run; nothing has been written."""
