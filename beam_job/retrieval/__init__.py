"""Downstream retrieval: FAISS indexes from feature shards, local re-ranking, evaluation and match pictures."""
