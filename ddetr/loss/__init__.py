"""Training loss: the Hungarian matcher and the set criterion (focal + L1 + GIoU)."""
