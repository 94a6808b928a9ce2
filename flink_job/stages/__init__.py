"""The pipeline's stages as plain Python: parse, lateness, near-duplicates, cleaning, batching, training, publishing.

Nothing here imports PyFlink, Kafka clients, serving or tools, so every stage is tested without a JVM.
"""
