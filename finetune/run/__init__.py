"""One training run: the trainer, its optimizer step, checkpoints, run files, metrics, plots, torchrun."""
