"""Quantization primitives: specs, fake-quantizers, and the one module that imports torch.ao (backend.py)."""
