"""PyFlink pipeline: Kafka events -> cleaning and de-duplication -> micro-batches -> online trainer -> embeddings."""
