"""Hyper-parameter sweeps (Optuna) and the learning-rate range test that keeps layer decay."""
