"""Model settings, kept apart from the modules that use them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 32
    lr: float = 0.05  # row-wise Adagrad step size
    l2: float = 1e-4
    init_std: float = 0.05
    implicit_negatives: int = 4  # uniformly sampled negatives per implicit event (BPR)
    rating_min: float = 1.0
    rating_max: float = 5.0
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    threads: int = 1  # torch intra-op threads; the JVM and Kafka need the other core

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"model config: dim must be positive, got {self.dim}")
        if self.lr <= 0:
            raise ValueError(f"model config: lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"model config: device must be auto, cpu or cuda, got {self.device!r}")
