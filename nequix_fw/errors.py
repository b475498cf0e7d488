"""One exception family for problems the user can fix (bad files, bad settings)."""


class NequixFWError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


class SettingsError(NequixFWError):
    """Invalid settings or command-line options."""


class StructureError(NequixFWError):
    """A structure file that cannot be read, or a structure the models cannot handle."""


class ModelError(NequixFWError):
    """A model checkpoint that is missing, corrupted, or incompatible with the others."""


class OutputError(NequixFWError):
    """An output location that cannot be written."""


class ServerError(NequixFWError):
    """A local MongoDB server that cannot be started, reached or stopped."""


class Interrupted(NequixFWError):
    """A command stopped by Ctrl-C (SIGINT): says what it had written and how a rerun ends it.
    `stored`: items written for sure; `in_flight`: items sent but not acknowledged (they may
    be written too)."""

    def __init__(self, message: str, stored: int = 0, in_flight: int = 0):
        super().__init__(message)
        self.stored, self.in_flight = stored, in_flight
