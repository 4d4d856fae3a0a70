"""Errors a user can act on: the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's input (model path, flags, files), with a message saying what."""


class ModelLoadError(UserError):
    """A checkpoint or GGUF file is missing, corrupt or of an unsupported architecture."""
