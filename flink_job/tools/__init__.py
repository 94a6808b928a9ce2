"""Command-line tools: the synthetic generator, the producer and the run report."""
