"""Networks: catalogue, weights, backbones, anatomy (stages and taps), classifier, layer table."""
