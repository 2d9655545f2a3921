"""The crosscoder's feature partition: `engine.partition`, under the name the crosscoder
modules import it by.

The partition lives below every package (the configuration and the results store use it
too); see that module for the layout of the four feature blocks.
"""

from engine.partition import Architecture, Partition, Role

__all__ = ["Architecture", "Partition", "Role"]
