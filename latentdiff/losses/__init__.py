"""Autoencoder training losses of the paper: LPIPS, the PatchGAN discriminator, and the KL / VQ
generator and discriminator objectives (`LPIPSWithDiscriminator`, `VQLPIPSWithDiscriminator`)."""
