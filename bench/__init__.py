"""Benchmarks: our training loop and predictor against the classic HF recipe, same run, same data."""
