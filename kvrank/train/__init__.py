"""Learning to rank on CPU: train query-side adapters over frozen, stored passage KV."""
