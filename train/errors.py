"""The user-error type every layer raises: the command line prints its message as one line and exits 2."""


class ConfigError(ValueError):
    """A user error in a config file, an override or an argument; its message is one line meant for the user."""
