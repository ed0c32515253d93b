"""Checkpoint I/O: on-disk formats and tensor names, ``from_pretrained`` / ``save_pretrained``, hub resolution and
the default model."""
