"""Evaluation: held-out metrics with baselines, T2I-CompBench probes, decoders, report, promotion gate."""
