"""megatron-sat: Sparsity-Accelerated Training (arXiv 2406.01392) for megatron-core."""

__version__ = "0.1.0"
