"""``python -m ddetr.annotate``: detect (and track) on images, folders and videos from the shell."""
