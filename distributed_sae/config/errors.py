"""The one exception type for bad user input, so entry points can print it and exit non-zero."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the value and the fix."""
