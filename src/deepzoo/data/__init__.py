"""Datasets: one module each, raw files to processed tensors, and the loader of those tensors."""
