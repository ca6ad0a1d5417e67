"""The export stage's error type (its own module, so it imports even if ``export`` resolves as a namespace)."""


class ExportError(RuntimeError):
    """The export cannot go on; the message says which step and why. Nothing has been written."""
