"""targets/lm."""
