"""Errors every layer may raise for bad user input (the lowest module of the package)."""


class ConfigError(ValueError):
    """A bad config file, flag, value or launch; the message says where and what to do instead.

    Entry points print it as one line and exit with status 2, as argparse does for a bad command
    line."""
