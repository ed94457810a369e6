"""Sweeps: a plan of runs, executed in local processes or on Ray."""
