"""Flax Linen modules: autoencoders, UNet, conditioning encoders."""
