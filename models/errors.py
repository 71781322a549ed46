"""The one exception family users see: messages name the file, line, field and what was expected."""


class DeepSpecError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(DeepSpecError):
    """A configuration value is unknown, missing or inconsistent."""


class DataError(DeepSpecError):
    """An input file is malformed; the message names file, line and field."""


class CacheMismatchError(DeepSpecError):
    """A target cache was written for a different target, tokenizer or layer set."""
