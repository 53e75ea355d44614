"""What training holds in memory besides activations: weights, gradients, optimiser state.

The number `vittune inspect` prints next to the trainable parameters, so that the saving of a
PEFT method (gradients and optimiser state only for the adapters) is visible before a run.
Activations depend on batch, resolution and kernels and are not estimated here (benchmarks/
peft_transfer.py measures whole-process peaks).
"""

from __future__ import annotations

from dataclasses import dataclass

# Optimiser state tensors per trained parameter: Adam-style (two moments) unless known simpler.
ONE_STATE = ("sgd", "momentum", "nesterov", "sgdp", "sgdw", "rmsprop", "adagrad", "lion")
NO_STATE = ("adafactor",)  # factored: O(rows + cols), small enough to count as none


def state_tensors(optimizer: str) -> int:
    name = optimizer.lower()
    if name in NO_STATE:
        return 0
    return 1 if name in ONE_STATE else 2


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes of each part, at `bytes_per_value` (4: float32 master weights)."""

    weights: int
    gradients: int
    optimiser: int
    ema: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.ema


def training_memory(
    total: int, trainable: int, optimizer: str, ema: bool, bytes_per_value: int = 4
) -> TrainingMemory:
    """Weights of all `total` parameters; gradients and optimiser state of the `trainable`
    ones; an EMA copy of all of them (timm's ModelEmaV3 copies the whole model)."""
    return TrainingMemory(
        weights=total * bytes_per_value,
        gradients=trainable * bytes_per_value,
        optimiser=trainable * state_tensors(optimizer) * bytes_per_value,
        ema=total * bytes_per_value if ema else 0,
    )
