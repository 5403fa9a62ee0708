"""Accelerators: where each node computes (placement), how (mixed precision, gradient
checkpointing), with what base (quantization), and how its memory is measured."""
