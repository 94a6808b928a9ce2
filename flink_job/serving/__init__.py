"""Serving: an in-memory embedding index fed from the embeddings topic, and its HTTP front."""
