"""Evaluation: datasets (BEIR folders, ir_datasets ids), metrics via ir_measures, latency, the eval pipeline."""
