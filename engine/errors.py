"""The project's one user-error base, and the configuration error raised everywhere.

Every error a user can fix derives from `UserError`: a bad setting (`ConfigError`) and the
domain errors of each package (the activation store's `StoreError`, the results database's
`ResultsDBError`, `CheckpointError`, `DataError`, `TrainingError`, `AlignmentError`,
`PlantedError`, `SweepError`, ...). Their messages are written for the person at the
command line, so the CLI catches `UserError` alone and prints the message on one line;
anything else reaching it is a bug and keeps its traceback.

This module imports nothing from the project, so any layer may raise these errors.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the CLI prints its message on one line, without a
    traceback, and exits 2."""


class ConfigError(UserError, ValueError):
    """A configuration value a user supplied is invalid (also raised for inputs that are
    not settings: a bad file, a missing package, a run that records too little)."""
