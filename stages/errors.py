class StageError(Exception):
    """A stage cannot go on; the message is one line for the user."""
