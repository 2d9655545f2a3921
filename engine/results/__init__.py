"""The results database: one DuckDB file of runs, features, contexts, explanations and triage."""

from engine.results.db import Database, ResultsDBError

__all__ = ["Database", "ResultsDBError"]
