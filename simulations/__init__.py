"""Named scenarios, the `fedge` command line, experiment runners and benchmarks."""
