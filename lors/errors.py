"""The error every stage raises for bad input: one line naming what and where, exit code 2."""


class LorsError(Exception):
    """Bad input (file, key, name, budget); the message is the one line the user sees."""


class ConfigError(LorsError, ValueError):
    """A params file or option that cannot be used."""


class DataError(LorsError):
    """A dataset file that is missing, unreadable or malformed."""
