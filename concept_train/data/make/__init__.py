"""Turning a batch's cells into model input: gene panels (panels), tokens (tokenize, with the
training view filters in filters) packed into a Batch (batch)."""
