"""The database schema: one SQL script per version, and the allow-list of tables and columns.

`MIGRATIONS[i]` upgrades a file from schema version i to i + 1 (version 0 is an empty file),
so the current version is `len(MIGRATIONS)`. A script, once released, never changes: a new
schema is a new script appended to the list, together with updates to `COLUMNS` (and the
other maps below), which always describe the newest version.

Times are naive UTC timestamps. JSON columns hold `json.dumps` text; the database decodes them.
"""

from __future__ import annotations

from engine.categories import CATEGORIES as FEATURE_CATEGORIES
from engine.contexts import KINDS
from engine.partition import Role

V1 = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);

CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    name VARCHAR,
    created_at TIMESTAMP NOT NULL,
    model_a JSON,
    model_b JSON,
    architecture VARCHAR,
    n_features INTEGER,
    partition JSON,
    config JSON,
    metrics JSON,
    checkpoint_path VARCHAR,
    store_path VARCHAR,
    provenance JSON
);

CREATE TABLE features (
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    partition VARCHAR NOT NULL,
    density DOUBLE,
    n_active BIGINT,
    max_act DOUBLE,
    mean_act DOUBLE,
    hist_counts BIGINT[],
    hist_edges DOUBLE[],
    dec_norm_a DOUBLE,
    dec_norm_b DOUBLE,
    rel_norm DOUBLE,
    dec_cos DOUBLE,
    dead BOOLEAN,
    s_max DOUBLE,
    PRIMARY KEY (run_id, feature_id)
);

CREATE TABLE windows (
    run_id VARCHAR NOT NULL,
    window_id BIGINT NOT NULL,
    doc_id VARCHAR,
    source VARCHAR,
    text VARCHAR NOT NULL,
    spans INTEGER[][] NOT NULL,
    ids_a INTEGER[],
    offsets_a INTEGER[][],
    ids_b INTEGER[],
    offsets_b INTEGER[][],
    PRIMARY KEY (run_id, window_id)
);

-- No key: quantile is NULL outside kind 'quantile'. Rows are written sorted by feature_id,
-- so DuckDB's zone maps keep per-feature look-ups fast without an index.
CREATE TABLE contexts (
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    kind VARCHAR NOT NULL,
    rank INTEGER NOT NULL,
    quantile INTEGER,
    window_id BIGINT NOT NULL,
    span_start INTEGER NOT NULL DEFAULT 0,  -- first aligned span of the window it covers
    span_end INTEGER,                       -- one past the last; NULL: to the window's end
    acts FLOAT[] NOT NULL,                  -- one activation per covered span
    max_act DOUBLE
);

CREATE TABLE neighbors (
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    neighbor_id INTEGER NOT NULL,
    cosine DOUBLE,
    rank INTEGER NOT NULL,
    space VARCHAR NOT NULL
);

CREATE TABLE matches (
    run_id VARCHAR NOT NULL,
    other_run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    other_feature_id INTEGER NOT NULL,
    cosine DOUBLE,
    partition VARCHAR,
    other_partition VARCHAR
);

CREATE SEQUENCE explanation_ids START 1;
CREATE TABLE explanations (
    explanation_id BIGINT PRIMARY KEY DEFAULT nextval('explanation_ids'),
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    explainer VARCHAR NOT NULL,
    prompt_version VARCHAR,
    explanation VARCHAR,
    harmful BOOLEAN,
    harmful_reason VARCHAR,
    raw VARCHAR,
    parsed BOOLEAN,
    created_at TIMESTAMP NOT NULL
);

CREATE SEQUENCE score_ids START 1;
CREATE TABLE scores (
    score_id BIGINT PRIMARY KEY DEFAULT nextval('score_ids'),
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    explanation_id BIGINT,
    judge VARCHAR NOT NULL,
    prompt_version VARCHAR,
    metric VARCHAR NOT NULL,
    value DOUBLE,
    n_examples INTEGER,
    details JSON,
    created_at TIMESTAMP NOT NULL
);

CREATE SEQUENCE sample_ids START 1;
CREATE TABLE steering_samples (
    sample_id BIGINT PRIMARY KEY DEFAULT nextval('sample_ids'),
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    model VARCHAR NOT NULL,
    prompt VARCHAR,
    alpha DOUBLE,
    s_max DOUBLE,
    seed BIGINT,
    temperature DOUBLE,
    max_new_tokens INTEGER,
    baseline VARCHAR,
    steered VARCHAR,
    transfer JSON,
    created_at TIMESTAMP NOT NULL,
    author VARCHAR
);

CREATE SEQUENCE eval_ids START 1;
CREATE TABLE evaluations (
    eval_id BIGINT PRIMARY KEY DEFAULT nextval('eval_ids'),
    run_id VARCHAR NOT NULL,
    feature_id INTEGER,
    kind VARCHAR NOT NULL,
    config JSON,
    result JSON,
    created_at TIMESTAMP NOT NULL
);

CREATE TABLE triage (
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    status VARCHAR NOT NULL,
    notes VARCHAR,
    reviewer VARCHAR,
    updated_at TIMESTAMP NOT NULL,
    PRIMARY KEY (run_id, feature_id)
);

-- Append-only: the store only ever inserts here.
CREATE SEQUENCE triage_history_ids START 1;
CREATE TABLE triage_history (
    history_id BIGINT PRIMARY KEY DEFAULT nextval('triage_history_ids'),
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    status VARCHAR NOT NULL,
    notes VARCHAR,
    reviewer VARCHAR,
    changed_at TIMESTAMP NOT NULL
);
"""

# Version 2: indexes for the dashboard's look-ups of one feature or window. DuckDB answers
# `column = ?` and short `IN` lists from an ART index only when the index holds that single
# column, so these are not (run_id, ...) composites (run_id is checked on the few rows found).
# Contexts, neighbours and matches get none: they are written sorted by feature_id, so zone
# maps already find a feature's rows, and an index over their millions of rows would slow
# every re-analysis and hold memory.
V2 = """
CREATE INDEX windows_window_id ON windows (window_id);
CREATE INDEX explanations_feature_id ON explanations (feature_id);
CREATE INDEX scores_feature_id ON scores (feature_id);
CREATE INDEX steering_samples_feature_id ON steering_samples (feature_id);
"""

# Version 3: the training metric history of a run (one record per logged step), so the
# dashboard can draw it without the run directory.
V3 = """
ALTER TABLE runs ADD COLUMN history JSON;
"""

# Exclusivity scores with their spread and the calibration protocol (paper Figure 5): a
# score's 95% interval over prompts x sampled generations, and the exclusivity of sampled
# features per category and of random directions (the null), which have no feature row.
EXCLUSIVITY_SPREAD = """
ALTER TABLE scores ADD COLUMN ci_low DOUBLE;
ALTER TABLE scores ADD COLUMN ci_high DOUBLE;

CREATE SEQUENCE calibration_ids START 1;
CREATE TABLE calibration (
    calibration_id BIGINT PRIMARY KEY DEFAULT nextval('calibration_ids'),
    run_id VARCHAR NOT NULL,
    protocol VARCHAR NOT NULL,
    judge VARCHAR NOT NULL,
    category VARCHAR NOT NULL,
    item INTEGER NOT NULL,      -- the feature id, or the random direction's number
    feature_id INTEGER,         -- NULL for a random direction
    value DOUBLE,               -- exclusivity; NULL when not interpretable
    ci_low DOUBLE,
    ci_high DOUBLE,
    unfiltered DOUBLE,          -- 6 - similarity even when not interpretable
    interpretability DOUBLE,
    details JSON,
    created_at TIMESTAMP NOT NULL
);
"""

# Logit effects (engine.analysis.logit_effects): each feature's most promoted and suppressed
# tokens in each model, with a histogram of all its effects, and the text of each token id
# of the run's two models, so the token lists are stored as ids. Written sorted by
# feature_id (zone maps find a feature's rows, as for contexts).
LOGIT_EFFECTS = """
CREATE TABLE logit_effects (
    run_id VARCHAR NOT NULL,
    feature_id INTEGER NOT NULL,
    model VARCHAR NOT NULL,          -- 'a' or 'b': whose final norm and unembedding
    vector VARCHAR NOT NULL,         -- 'decoder' (its own) or 'transfer' (translated)
    promoted_ids INTEGER[],
    promoted_values DOUBLE[],
    suppressed_ids INTEGER[],
    suppressed_values DOUBLE[],
    hist_counts BIGINT[],            -- equal bins from hist_min to hist_max
    hist_min DOUBLE,
    hist_max DOUBLE
);

CREATE TABLE vocab (
    run_id VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    token_id INTEGER NOT NULL,
    token VARCHAR NOT NULL,
    PRIMARY KEY (run_id, model, token_id)
);
"""

# Judge-free effect measure (engine.steering.effects): per run and settings key, each
# measured feature and each random direction of the null (kind 'null', cached so a run
# computes its null once), with the exclusivity, its z-score and percentile against the
# null, and the per-model effects in details.
EFFECTS = """
CREATE SEQUENCE effect_ids START 1;
CREATE TABLE effects (
    effect_id BIGINT PRIMARY KEY DEFAULT nextval('effect_ids'),
    run_id VARCHAR NOT NULL,
    settings VARCHAR NOT NULL,  -- digest of the measure's settings, stitch and models
    kind VARCHAR NOT NULL,      -- 'feature', 'null' (a random direction) or 'direction'
    item INTEGER NOT NULL,      -- the feature id, or the direction's number
    feature_id INTEGER,         -- NULL for a direction
    source VARCHAR NOT NULL,    -- the model steered with the vector itself
    similarity DOUBLE,          -- rank correlation of the two models' effects
    exclusivity DOUBLE,         -- 1 - similarity
    z DOUBLE,                   -- against the null of the same source model
    percentile DOUBLE,          -- % of that null less exclusive
    details JSON,
    created_at TIMESTAMP NOT NULL
);
"""

# Version 7: the crosscoder weights a run was analysed from (a fingerprint), and the same
# fingerprint on every analyst row (explanations, scores, triage and its history), so a
# verdict stays with the weights it was made on: re-analysing a run id from other weights
# is refused while analyst work of the old ones exists (`Database.check_weights`).
WEIGHTS = """
ALTER TABLE runs ADD COLUMN weights VARCHAR;
ALTER TABLE explanations ADD COLUMN weights VARCHAR;
ALTER TABLE scores ADD COLUMN weights VARCHAR;
ALTER TABLE triage ADD COLUMN weights VARCHAR;
ALTER TABLE triage_history ADD COLUMN weights VARCHAR;
"""

MIGRATIONS: list[str] = [V1, V2, V3, EXCLUSIVITY_SPREAD, LOGIT_EFFECTS, EFFECTS, WEIGHTS]

# Rows an analyst's work (or paid requests) produced about a run's features: they describe
# the features of the weights the run was analysed from. The first four carry `weights`.
STAMPED = ("explanations", "scores", "triage", "triage_history")
ANALYST_TABLES = (*STAMPED, "steering_samples", "evaluations", "calibration")

# The indexes of the newest version: name -> (table, column).
INDEXES: dict[str, tuple[str, str]] = {
    "windows_window_id": ("windows", "window_id"),
    "explanations_feature_id": ("explanations", "feature_id"),
    "scores_feature_id": ("scores", "feature_id"),
    "steering_samples_feature_id": ("steering_samples", "feature_id"),
}

# The allow-list: the only table and column names that ever reach an SQL string.
COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": (
        "run_id", "name", "created_at", "model_a", "model_b", "architecture", "n_features",
        "partition", "config", "metrics", "checkpoint_path", "store_path", "provenance",
        "history", "weights",
    ),
    "features": (
        "run_id", "feature_id", "partition", "density", "n_active", "max_act", "mean_act",
        "hist_counts", "hist_edges", "dec_norm_a", "dec_norm_b", "rel_norm", "dec_cos", "dead",
        "s_max",
    ),
    "windows": (
        "run_id", "window_id", "doc_id", "source", "text", "spans", "ids_a", "offsets_a",
        "ids_b", "offsets_b",
    ),
    "contexts": (
        "run_id", "feature_id", "kind", "rank", "quantile", "window_id", "span_start",
        "span_end", "acts", "max_act",
    ),
    "neighbors": ("run_id", "feature_id", "neighbor_id", "cosine", "rank", "space"),
    "matches": (
        "run_id", "other_run_id", "feature_id", "other_feature_id", "cosine", "partition",
        "other_partition",
    ),
    "explanations": (
        "explanation_id", "run_id", "feature_id", "explainer", "prompt_version", "explanation",
        "harmful", "harmful_reason", "raw", "parsed", "created_at", "weights",
    ),
    "scores": (
        "score_id", "run_id", "feature_id", "explanation_id", "judge", "prompt_version",
        "metric", "value", "n_examples", "details", "created_at", "ci_low", "ci_high",
        "weights",
    ),
    "steering_samples": (
        "sample_id", "run_id", "feature_id", "model", "prompt", "alpha", "s_max", "seed",
        "temperature", "max_new_tokens", "baseline", "steered", "transfer", "created_at",
        "author",
    ),
    "evaluations": (
        "eval_id", "run_id", "feature_id", "kind", "config", "result", "created_at",
    ),
    "triage": ("run_id", "feature_id", "status", "notes", "reviewer", "updated_at", "weights"),
    "calibration": (
        "calibration_id", "run_id", "protocol", "judge", "category", "item", "feature_id",
        "value", "ci_low", "ci_high", "unfiltered", "interpretability", "details", "created_at",
    ),
    "triage_history": (
        "history_id", "run_id", "feature_id", "status", "notes", "reviewer", "changed_at",
        "weights",
    ),
    "logit_effects": (
        "run_id", "feature_id", "model", "vector", "promoted_ids", "promoted_values",
        "suppressed_ids", "suppressed_values", "hist_counts", "hist_min", "hist_max",
    ),
    "vocab": ("run_id", "model", "token_id", "token"),
    "effects": (
        "effect_id", "run_id", "settings", "kind", "item", "feature_id", "source",
        "similarity", "exclusivity", "z", "percentile", "details", "created_at",
    ),
}  # fmt: skip

JSON_COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("model_a", "model_b", "partition", "config", "metrics", "provenance", "history"),
    "scores": ("details",),
    "steering_samples": ("transfer",),
    "evaluations": ("config", "result"),
    "calibration": ("details",),
    "effects": ("details",),
}

# List columns and how deeply they nest (2: one [n, 2] array per row).
LIST_COLUMNS: dict[str, dict[str, int]] = {
    "features": {"hist_counts": 1, "hist_edges": 1},
    "windows": {"spans": 2, "ids_a": 1, "offsets_a": 2, "ids_b": 1, "offsets_b": 2},
    "contexts": {"acts": 1},
    "logit_effects": {
        "promoted_ids": 1, "promoted_values": 1, "suppressed_ids": 1, "suppressed_values": 1,
        "hist_counts": 1,
    },
}  # fmt: skip

# Tables written in bulk from a DataFrame, the columns a frame must have, and the columns
# whose values are restricted to a fixed set.
BULK_REQUIRED: dict[str, tuple[str, ...]] = {
    "features": ("feature_id", "partition"),
    "windows": ("window_id", "text", "spans"),
    "contexts": ("feature_id", "kind", "rank", "window_id", "acts"),
    "neighbors": ("feature_id", "neighbor_id", "cosine", "rank", "space"),
    "matches": ("feature_id", "other_feature_id", "cosine"),
    "explanations": ("feature_id", "explainer", "prompt_version", "explanation"),
    "scores": ("feature_id", "judge", "prompt_version", "metric", "value"),
    "logit_effects": ("feature_id", "model", "vector"),
    "vocab": ("token_id", "token"),
}

# Tables appended to in bulk (rows keep their own ids) and the sequence numbering each.
SEQUENCES: dict[str, str] = {"explanations": "explanation_ids", "scores": "score_ids"}

PARTITIONS = tuple(role.value for role in Role)  # a_exclusive ... designated_shared
# A feature's partition, with shared features past the relative-norm bounds set apart as
# a_leaning / b_leaning (engine.categories); computed by queries, not stored.
CATEGORIES = FEATURE_CATEGORIES
CONTEXT_KINDS = KINDS
SPACES = ("a", "b")
MODELS = ("a", "b")
# Which vector a logit effect reads: the feature's own decoder in that model, or its
# shared-partition transfer (an exclusive feature in the other model).
LOGIT_VECTORS = ("decoder", "transfer")
TRIAGE_STATUSES = ("unreviewed", "screening", "verified", "false positive", "needs steering")

BULK_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "features": {"partition": PARTITIONS},
    "contexts": {"kind": CONTEXT_KINDS},
    "neighbors": {"space": SPACES},
    "matches": {"partition": PARTITIONS, "other_partition": PARTITIONS},
    "logit_effects": {"model": MODELS, "vector": LOGIT_VECTORS},
}

FEATURE_ORDER = ("feature_id", "max_act", "density", "rel_norm", "n_active", "s_max", "dec_cos")
FEATURE_TABLE_ORDER = (*FEATURE_ORDER, "score", "exclusivity", "updated_at")
