"""Feature categories: a feature's partition, with lopsided shared features set apart.

A shared feature may still serve mostly one model: its decoder in the other model can be a
small fraction of its norm (a concept only model A has, learned by a shared feature, keeps
a B decoder worth B's mean activation where it fires). Such a feature is an exclusive
candidate just like an exclusive-partition feature, and in a standard crosscoder (no
exclusive partitions) it is the only kind. Its relative decoder norm
‖d_A‖ / (‖d_A‖ + ‖d_B‖) says so: above `A_LEANING_ABOVE` the feature is "A-leaning",
below `B_LEANING_BELOW` "B-leaning".

Categories split the features without overlap: a shared feature is A-leaning, B-leaning
or "shared" (leaning to neither); every other feature's category is its partition. The
results store computes the same categories in SQL from these constants.

`MATCH_COSINE` is the other number that sorts features across the project: the decoder
cosine at which a feature of one run recurs in another run on the same model pair.
"""

from __future__ import annotations

from engine.partition import Role

A_LEANING_ABOVE = 0.8  # a shared feature with relative decoder norm above this leans to A
B_LEANING_BELOW = 0.2  # ... below this, to B
# A feature recurs in another run when its best decoder cosine there
# (engine.analysis.geometry.match_runs) is at least this.
MATCH_COSINE = 0.7

# The partitions (engine.partition.Role), as the plain strings tables and SQL hold.
A_EXCLUSIVE = Role.A_EXCLUSIVE.value
B_EXCLUSIVE = Role.B_EXCLUSIVE.value
SHARED = Role.SHARED.value
DESIGNATED = Role.DESIGNATED.value
A_LEANING = "a_leaning"
B_LEANING = "b_leaning"

# From "only in A" to "only in B", the order in which lists and tables show them.
CATEGORIES = (A_EXCLUSIVE, A_LEANING, SHARED, DESIGNATED, B_LEANING, B_EXCLUSIVE)
EXCLUSIVE = (A_EXCLUSIVE, B_EXCLUSIVE)
LEANING = (A_LEANING, B_LEANING)
# Where to look for what one model represents and the other does not.
CANDIDATES = (A_EXCLUSIVE, A_LEANING, B_LEANING, B_EXCLUSIVE)
LABELS = {
    A_EXCLUSIVE: "A-exclusive",
    A_LEANING: "A-leaning shared",
    SHARED: "shared",
    DESIGNATED: "designated shared",
    B_LEANING: "B-leaning shared",
    B_EXCLUSIVE: "B-exclusive",
}
# The model a category's features serve (shared and designated features serve both).
MODEL_OF = {A_EXCLUSIVE: "a", A_LEANING: "a", B_LEANING: "b", B_EXCLUSIVE: "b"}
DESCRIPTION = (
    f"A-leaning shared: shared features whose relative decoder norm ‖d_A‖ / (‖d_A‖ + ‖d_B‖) "
    f"is above {A_LEANING_ABOVE:g}; B-leaning shared: below {B_LEANING_BELOW:g}. They are "
    "exclusive candidates the partition alone would hide; shared: the other shared features."
)


def category(partition: str, rel_norm: float | None) -> str:
    """The category of a feature with this partition and relative decoder norm."""
    if partition != SHARED:
        return str(partition)
    try:
        value = float(rel_norm)
    except (TypeError, ValueError):  # None or pandas' NA: no decoder norms to judge by
        return SHARED
    if value > A_LEANING_ABOVE:
        return A_LEANING
    if value < B_LEANING_BELOW:
        return B_LEANING
    return SHARED  # NaN lands here too: it compares false both ways
