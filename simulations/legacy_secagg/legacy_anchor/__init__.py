"""Benchmark anchor: Flower 1.42's legacy SecAgg+ workflow on fedge's edge model and data."""
