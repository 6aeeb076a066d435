"""The error every configuration mistake raises, apart from the config schema that raises most of
them, so that the modality registry (which :mod:`d2v2scale.config` reads) can raise it too."""


class ConfigError(ValueError):
    """A configuration or command-line mistake; the message is one line meant for the user."""
