"""User-facing errors: raised for bad input, shown as one line (CLI exit code 2, ComfyUI node error)."""


class UserError(ValueError):
    """A mistake in what the user gave us (a file, a size, a range), not a bug.

    Subclasses ``ValueError`` so ComfyUI and callers that catch ``ValueError`` see it as bad input.
    """
