"""Placeholder: being written."""
MultiheadAttention = None
