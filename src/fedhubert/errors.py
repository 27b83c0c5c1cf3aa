"""Errors that the command line reports as a one-line message (no traceback): the user can fix them."""


class FedhubertError(Exception):
    """Base class for problems with the user's input, files or environment."""


class ConfigError(FedhubertError):
    """A config key is unknown, of the wrong type or out of range."""


class AudioError(FedhubertError):
    """An audio file is unreadable, empty, or not 16 kHz mono."""


class MissingToolError(FedhubertError):
    """A required external program (espeak-ng, sox) is not installed."""


class OutputExistsError(FedhubertError):
    """A stage's output folder already holds results and --force was not given."""


class StageStopped(FedhubertError):
    """A stage stopped early at request (SIGTERM, as Slurm sends at a time limit) after saving its state; it
    continues with --resume. The command exits with EXIT_STOPPED."""


EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, try again (resume)
