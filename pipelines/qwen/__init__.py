"""Qwen-Image adapters (Qwen-Image, 2512, Edit, Edit-2509/2511) on diffusers' Qwen-Image pipelines.

adapter: the adapters and their render stages; lora_state: the LoRA a loaded pipeline carries;
encode: control-image routing and preprocessing; edit_plus_loop: ai-toolkit's edit-plus sampler;
vae_cache: cached control-image latents; decode: latents to pixels.
"""
