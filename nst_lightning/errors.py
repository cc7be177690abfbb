"""User-facing errors.

Anything raised as an :class:`NSTError` is a problem with the user's input or environment, not a
bug: the command line prints its message as one line and exits non-zero, without a traceback.
Messages name the problem and the fix.
"""


class NSTError(Exception):
    """Base class of the errors that the CLI reports as one clear line."""


class ConfigError(NSTError, ValueError):
    """A configuration value that cannot work (unknown layer, bad weight, too small an image...)."""


class ImageError(NSTError):
    """An image that cannot be read, or an output that cannot be written."""


class WeightsError(NSTError):
    """Backbone weights that cannot be had or do not fit the network."""


class NumericalError(NSTError):
    """The optimisation produced a non-finite loss."""
