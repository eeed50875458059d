"""Linear heads on frozen features: linear-probe, stage-probe and the DeCAF table."""
