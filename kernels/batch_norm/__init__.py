"""Training-mode BatchNorm over NCHW with a fused activation before it and residual after it."""
