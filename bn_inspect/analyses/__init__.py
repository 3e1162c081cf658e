"""The runs: inspection, train/eval comparison and recalibration over batches."""
