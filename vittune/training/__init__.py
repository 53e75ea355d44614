"""A training run: its folder, resume point, Trainer, checkpoints, tracking, console and results.

`run.fit` puts these in order for `vittune finetune | pretrain-mae | distill`.
"""
