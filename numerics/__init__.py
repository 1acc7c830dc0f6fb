"""lowbit numerics core: pure array math for quantization (no model knowledge)."""
