"""Corpus store, sharded Faiss index build, and the gRPC k-NN shard service.

Nothing here imports language-model code: this package only turns text into vectors and
answers nearest-neighbour queries by id, distance and text.
"""
