"""The results database: every read and write of the DuckDB file, in parameterised SQL.

A `Database` is safe to share between threads: each call runs on its own cursor, and writes
take a lock and run in one transaction, so a reader never sees half of a replacement.

DuckDB lets one process hold a file open for writing, or several processes for reading. A
`Database(..., hold=False)` therefore holds no connection between calls: each call opens
the file (read-only for a read), runs and closes it, so the dashboard and the `modeldiff`
commands can take turns on one file. Opening waits, with back-off, while another process
holds the lock.

Values reach SQL only as `?` parameters; table and column names only from the allow-list in
`engine.results.schema`.

`Database` is assembled here from one mixin per family of tables; the rest of the package:

- `base` (the connection, transactions, schema upgrade) and `tables` (the row reads and
  writes every family shares);
- `connection` (opening the file: lock back-off, damage checks), `values` (values and
  Arrow conversion), `clauses` (shared SQL fragments), `errors`;
- the families: `runs`, `features` (with `features_sql`, the feature table's query),
  `contexts` (windows and contexts), `neighbors` (and matches), `logit_effects` (and the
  token texts), `explanations` (and scores), `steering` (and evaluations), `effects`
  (the judge-free effect measure and its null), `triage`,
  `export`.
"""

from __future__ import annotations

from engine.results.contexts import ContextsMixin
from engine.results.effects import EffectsMixin
from engine.results.errors import ResultsDBError
from engine.results.explanations import ExplanationsMixin
from engine.results.export import ExportMixin
from engine.results.features import FeaturesMixin
from engine.results.logit_effects import LogitEffectsMixin
from engine.results.neighbors import NeighborsMixin
from engine.results.runs import RunsMixin
from engine.results.steering import SteeringMixin
from engine.results.triage import TriageMixin

__all__ = ["Database", "ResultsDBError"]


class Database(
    RunsMixin,
    FeaturesMixin,
    ContextsMixin,
    NeighborsMixin,
    LogitEffectsMixin,
    ExplanationsMixin,
    SteeringMixin,
    EffectsMixin,
    TriageMixin,
    ExportMixin,
):
    """The results database in one DuckDB file; safe to share between threads."""
