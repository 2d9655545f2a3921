"""Planted-concept benchmark: give one model of a pair a concept the other lacks, then check
which crosscoder partition learns it.

Two plantings (see docs/planted.md):

* ``embedding`` (`embedding.py`): a random direction is added to the input embeddings of a
  seeded set of mid-frequency trigger tokens; the planted model is saved as a local Hugging
  Face directory and the pair is harvested again with it in its slot.
* ``residual`` (`pairs.py`): no model changes; a training source adds a random direction to
  one model's stored activations on a hashed, seeded subset of pairs. The other model's
  activations carry no information about which pairs were picked.

`sweep.run_planted` trains crosscoder variants (`variants.py`) on the planted pairs and
scores them (`evaluate.py`); `cli.py` is `modeldiff planted`.
"""

from engine.errors import ConfigError

KINDS = ("residual", "token", "embedding")


class PlantedError(ConfigError):
    """A planted-concept benchmark setting or input is invalid."""
