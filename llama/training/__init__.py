"""Training as a library: configuration, token shards and their order, the loop's pieces (parallelize, optimizer,
schedule, step, evaluation), resumable checkpoints, metrics and plots."""
