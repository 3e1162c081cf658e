"""--shape / --input -> batches of tensors."""
