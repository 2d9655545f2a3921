"""Feature analysis: statistics, max-activating contexts, neighbours and run matching."""
