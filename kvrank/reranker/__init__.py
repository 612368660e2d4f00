"""Block-attention reranking over stored, reused passage KV."""
