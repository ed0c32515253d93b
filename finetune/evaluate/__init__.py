"""COCO evaluation of a model on a validated split; ``python -m finetune.evaluate`` is its command line."""
