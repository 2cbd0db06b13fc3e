"""Running a model (plus adapter): text generation and evaluation (loss, perplexity, exact match)."""
