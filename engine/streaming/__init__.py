"""Streaming training: a crosscoder trained on activations computed live from the two
models, with no full activation store (`modeldiff train --stream`, docs/scaling.md).

    source   StreamSource: the trainer's paired-batch source, cut from the live window
             stream in shuffled blocks; exact resume by replaying the tokenisation
    run      a streamed run's data side: its settings (stream.json) checked on resume,
             the models loaded, the analysis store harvested into RUN_DIR/store
"""
