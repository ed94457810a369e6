"""Backends: the fast paths and the compiled kernels they call."""
