"""Runnable examples (``python -m lora_kernels.examples.<name>``)."""
