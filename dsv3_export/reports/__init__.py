"""Accuracy diff reports and latency profiles of engine directories (`dsv3-export diff` / `profile`)."""
