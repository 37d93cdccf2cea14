"""Placeholder: being written (see issues)."""
def wkv4(*a, **k):
    raise NotImplementedError
