"""The results database: one DuckDB file of runs, features, contexts, explanations and triage."""

from engine.store.db import Database, StoreDBError

__all__ = ["Database", "StoreDBError"]
