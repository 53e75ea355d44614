"""vittune: fine-tune, MAE-pretrain and distill Vision Transformers from one YAML recipe.

The package map and its import layers are in docs/architecture.md; tests/test_layers.py holds
them.
"""
