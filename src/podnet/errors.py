"""Errors podnet raises for bad configuration and exhausted resources.

Bad input from the wire is never an exception (it is a counted drop); these are for what a user
or an operator asked for and podnet cannot do.
"""


class PodnetError(Exception):
    """Base class of podnet's own errors."""


class ConfigError(PodnetError):
    """A manifest, topology or option is invalid. The message names the file, object and field."""


class IPAMExhausted(PodnetError):
    """A pool has no free address left. The message names the pool (host-local's wording)."""


class LimitExceeded(PodnetError):
    """A table is full. The message names the limit that was hit."""
