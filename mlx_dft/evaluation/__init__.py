"""Evaluation: losses on supervised tokens, and generation accuracy with real answer checking."""
