"""Quantization-aware fine-tuning: fake quantization with learned step sizes (LSQ), then the IntegerModel path."""
