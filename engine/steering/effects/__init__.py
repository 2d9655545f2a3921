"""Judge-free verification: how a steering vector moves each model's next-token
distribution at a matched KL, compared across models on a panel of strings and read
against random directions drawn from the models' activation covariance.

- `probe`: one model's teacher-forced effects (KL, iso-KL strength, string log-probabilities);
- `measure`: one vector and its stitched copy -> an `Effect` (similarity, exclusivity);
- `null`: random directions from the activation covariance, and a value's standing;
- `session`: both models, the stitch and the cached null;
- `run`: a run's features into the results DB, and `measure_feature` for other code.
"""

from engine.steering.effects.measure import Effect, EffectsConfig
from engine.steering.effects.run import measure_feature, measure_features

__all__ = ["Effect", "EffectsConfig", "measure_feature", "measure_features"]
