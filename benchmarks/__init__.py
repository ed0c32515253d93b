"""Benchmarks (not product code): ``python -m benchmarks`` compares ddetr with transformers on the same weights.

transformers is imported here only, lazily, as the reference to time against; ddetr itself never imports it.
"""
