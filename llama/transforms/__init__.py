"""Model transforms applied from outside the model: weight-only quantisation and tensor parallelism."""
