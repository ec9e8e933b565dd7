class ExtractError(Exception):
    """Bad input or environment: reported to the user as one line, without a traceback."""
