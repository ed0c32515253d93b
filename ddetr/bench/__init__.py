"""Benchmarks: ``python -m ddetr.bench`` compares ddetr with transformers on the same weights."""
