class ConfigError(Exception):
    """Bad settings or inputs: reported to the user as one line, without a traceback."""
