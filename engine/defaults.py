"""Defaults the command line shows in its help, kept here so that building the parser
imports no torch (every `modeldiff` call, `--help` included, would wait seconds for it)."""

SEGMENT_PAIRS = 32  # analysis: consecutive aligned pairs of one window per context
EVALUATION_WINDOWS = 32  # evaluate: held-out windows (the demo run holds out 7: 1,095 pairs)
SAMPLED_TEMPERATURE = 0.7  # steering: sampled decoding (paper B.5)
SAMPLED_TOP_P = 0.9
