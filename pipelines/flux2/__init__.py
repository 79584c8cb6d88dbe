"""The FLUX.2-dev adapter, sampling as ai-toolkit does on diffusers' FLUX.2 networks.

adapter: the adapter and its render stages; text: Mistral-3 prompt encoding; sampler: schedule,
noise, ids, packing and the Euler loop; vae: latent (de)normalisation and reference images;
lora: ai-toolkit LoRAs merged into the weights; numerics: ai-toolkit's rounding in diffusers' modules.
"""
