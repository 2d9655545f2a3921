"""Loading the models and tokenizers that are diffed."""
