"""The one error of the transformers interchange."""


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; the message says why."""
