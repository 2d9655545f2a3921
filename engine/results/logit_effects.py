"""The logit_effects and vocab tables: each feature's most promoted and suppressed tokens in
each model with a histogram of all its logit effects (engine.analysis.logit_effects), and the
text of each token id of the run's models, so the token lists are stored as ids."""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.results import schema
from engine.results.clauses import _equals
from engine.results.tables import Tables
from engine.results.values import _choices

_LISTS = ("promoted", "suppressed")


class LogitEffectsMixin(Tables):
    """Write and read logit effects and the token texts they name."""

    def write_logit_effects(self, run_id: str, df: pd.DataFrame) -> int:
        """Replace the run's logit effects with the frame's rows (one per feature and model)."""
        return self._replace("logit_effects", {"run_id": run_id}, df, '"feature_id", "model"')

    def write_vocab(self, run_id: str, model: str, tokens: list[str]) -> int:
        """Replace the text of model `model`'s token ids (position = id) for the run."""
        model = _choices(model, schema.MODELS, "model")[0]
        frame = pd.DataFrame(
            {"token_id": np.arange(len(tokens), dtype=np.int64), "token": list(tokens)}
        )
        return self._replace("vocab", {"run_id": run_id, "model": model}, frame, '"token_id"')

    def has_logit_effects(self, run_id: str) -> bool:
        """Whether the run's analysis stored logit effects."""
        with self._cursor() as cur:
            self._require_run(cur, run_id)
            sql = "SELECT 1 FROM logit_effects WHERE run_id = ? LIMIT 1"
            return cur.execute(sql, [run_id]).fetchone() is not None

    def logit_effects(self, run_id: str, feature_id: int) -> pd.DataFrame:
        """A feature's logit effects, one row per model (A first), with the token texts:
        promoted_tokens / suppressed_tokens beside the id lists. Empty when none are stored."""
        where, params = _equals("logit_effects", run_id, feature_id=int(feature_id))
        sql = f"SELECT * EXCLUDE (run_id) FROM logit_effects WHERE {where} ORDER BY model"
        df = self._frame(sql, params, run_id, "logit_effects")
        texts = {
            model: self.token_texts(run_id, model, _ids(df[df["model"] == model]))
            for model in df["model"].unique()
        }
        for name in _LISTS:
            df[f"{name}_tokens"] = [
                [texts[model].get(int(i), f"<id {i}>") for i in ids]
                for model, ids in zip(df["model"], df[f"{name}_ids"], strict=True)
            ]
        return df

    def token_texts(self, run_id: str, model: str, token_ids: list[int]) -> dict[int, str]:
        """The stored texts of some token ids of model `model`: {id: text} (ids not stored
        are left out)."""
        model = _choices(model, schema.MODELS, "model")[0]
        if not token_ids:
            return {}
        marks = ", ".join("?" for _ in token_ids)
        sql = (
            f"SELECT token_id, token FROM vocab WHERE run_id = ? AND model = ? "
            f"AND token_id IN ({marks})"
        )
        with self._cursor() as cur:
            rows = cur.execute(sql, [run_id, model, *map(int, token_ids)]).fetchall()
        return {int(i): str(t) for i, t in rows}


def _ids(rows: pd.DataFrame) -> list[int]:
    """The token ids the rows' promoted and suppressed lists name, once each."""
    return sorted({int(i) for name in _LISTS for ids in rows[f"{name}_ids"] for i in ids})
