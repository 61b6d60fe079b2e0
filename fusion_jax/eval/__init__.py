"""Generation and evaluation of every model the project makes (plain decoders and fused models).

``loss``: held-out response-token cross-entropy per domain in fixed-shape batches (compiles once).
"""
