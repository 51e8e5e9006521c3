"""Checkpoint files -> engine modules: format detection, key maps, LoRA, precision, placement."""
