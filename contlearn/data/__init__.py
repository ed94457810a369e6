"""Datasets: downloads with checksums and the MNIST test set shipped in the package."""
