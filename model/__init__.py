"""Online recommender models in PyTorch. Knows nothing of Flink: the job hands it micro-batches."""
