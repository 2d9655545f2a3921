"""The factorial benchmark's cells: which model carries the behaviour (A, B)."""

CELLS = {
    "A only": (True, False),
    "B only": (False, True),
    "both": (True, True),
    "neither": (False, False),
}
