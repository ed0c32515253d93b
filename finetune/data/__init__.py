"""Datasets: opening every supported source, validation, splits, augmentation, batching."""
