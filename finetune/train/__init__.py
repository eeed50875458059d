"""Fine-tuning: setup (freezing, BatchNorm, LR groups), the loop, checkpoints and signals."""
