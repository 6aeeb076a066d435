"""The error every configuration mistake raises, apart from the config schema that raises most of
them, so that the modality registry (which :mod:`d2v2scale.config` reads) can raise it too.

Every other exception class of the package lives beside the code that raises it; this is where a
reader finds them all, and the exit code each one ends a launch with (``d2v2scale/exit_codes.py``):

==========================  ==============================  ====================================
class                       module                          exit code, and why
==========================  ==============================  ====================================
``ConfigError``             ``errors``                      2: configuration or arguments
``UsageError``              ``errors``                      2 (a ``ConfigError``): a command line
                                                            its parser refused
``DataError``               ``data.files``                  2: a data set that cannot be used
``CheckpointError``         ``train.verify``                2: a damaged checkpoint, pickled code
``ShardFormatError``        ``train.shards``                2 (a ``CheckpointError``): shards
                                                            that do not describe the model
``KeyMappingError``         ``interop.fairseq``             2 (the converter's one line): a
                                                            fairseq checkpoint of another layout
``CheckpointWriteError``    ``train.checkpoint``            1: a checkpoint could not be written
                                                            (full disk); ``latest`` untouched
``NonFiniteTraining``       ``train.faults``                1: too many non-finite steps in a row
``Preempted``               ``train.faults``                3: stopped by a signal after its
                                                            checkpoint (requeue)
``AlreadyComplete``         ``train.run``                   0: ``--resume auto`` on a finished run
==========================  ==============================  ====================================
"""


class ConfigError(ValueError):
    """A configuration or command-line mistake; the message is one line meant for the user."""


class UsageError(ConfigError):
    """A command line the tool's parser refused (:class:`d2v2scale.cli.OneLineParser`); raised instead
    of printed where only one process of a launch should say it."""
