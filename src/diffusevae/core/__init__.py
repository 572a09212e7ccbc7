"""The mathematics and the networks: the noise schedule and the four formulations
(diffusion), the samplers, the UNet and the VAE, the latent priors and the sample-quality
metrics. Tensors in, tensors out; the networks save and load through io.checkpoint and
nothing else here touches a file.
"""
