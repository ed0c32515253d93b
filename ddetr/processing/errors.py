"""Error types raised by ``ddetr.processing`` for inputs it refuses."""

from __future__ import annotations


class ImageInputError(ValueError):
    """An image (or its annotation) given to a processor was rejected; the message names the problem.

    Every input that preprocessing cannot turn into finite pixel values raises this type, so callers (a web demo,
    a data loader) need one ``except ImageInputError`` to tell bad user input apart from bugs. It subclasses
    ``ValueError`` so code written against transformers' processors, which raise ``ValueError``, keeps working.
    """


class AnnotationError(ImageInputError):
    """A COCO annotation attached to an image is malformed (missing keys, non-numeric boxes, wrong count)."""
