"""The Flower ServerApp: rounds, sampling, aggregation, evaluation, checkpoints, metrics."""
