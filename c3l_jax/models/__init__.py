"""Pure Flax NNX model definitions (no pipeline knowledge)."""
