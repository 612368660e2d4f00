"""Evaluation: datasets (BEIR folders, ir_datasets ids), ir_measures metrics, latency, the pipeline."""
