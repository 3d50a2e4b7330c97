"""Training side: streams, model, trainer (built in later issues)."""
