"""The released models' component configs, written out, for sizing real models without their files.

No model hub is reachable where previewd is developed, and the library defaults are not always the
released shapes: `Qwen2_5_VLConfig()` is a 72B-class model in transformers 5, and `Mistral3Config()`
ties the LM head, which FLUX.2-dev's Mistral-Small-3.x checkpoint does not. So the values below are
copied from the released `config.json` files (named per entry) and checked by parameter count in
tests/pipelines/test_memory_plan.py: Qwen-Image transformer 20.43B, Qwen2.5-VL-7B 8.29B, FLUX.2-dev
transformer 32.2B, Mistral-Small-3.2-24B 24.0B.

`build(family, component, config)` instantiates a component on the meta device (no memory), or with
random weights on a real device (bench/gpu.py).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

QWEN_TRANSFORMER: dict[str, Any] = {
    # Qwen/Qwen-Image transformer/config.json (also -2512, -Edit, -Edit-2509; -2511 adds zero_cond_t).
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}

QWEN_TEXT_ENCODER: dict[str, Any] = {
    # Qwen/Qwen-Image text_encoder/config.json = Qwen2.5-VL-7B-Instruct.
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "in_channels": 3, "hidden_act": "silu", "tokens_per_second": 2,
    },
    "tie_word_embeddings": False,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}

QWEN_VAE: dict[str, Any] = {
    # Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage; 127M parameters).
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0,
}

FLUX2_TRANSFORMER: dict[str, Any] = {
    # black-forest-labs/FLUX.2-dev transformer/config.json.
    "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
    "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}

FLUX2_TEXT_ENCODER: dict[str, Any] = {
    # black-forest-labs/FLUX.2-dev text_encoder/config.json = Mistral-Small-3.2-24B-Instruct-2506:
    # the LM head is its own tensor (language_model.lm_head.weight in the checkpoint).
    "text_config": {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "sliding_window": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000000.0}, "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_channels": 3, "image_size": 1540, "patch_size": 14, "head_dim": 64,
        "hidden_act": "silu",
    },
    "image_token_index": 10, "projector_hidden_act": "gelu", "multimodal_projector_bias": False,
    "spatial_merge_size": 2, "vision_feature_layer": -1, "tie_word_embeddings": False,
}

FLUX2_VAE: dict[str, Any] = {
    # black-forest-labs/FLUX.2-dev vae/config.json (AutoencoderKLFlux2; 84M parameters).
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024, "patch_size": [2, 2],
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

REAL: dict[str, dict[str, dict[str, Any]]] = {
    "qwen": {"transformer": QWEN_TRANSFORMER, "text_encoder": QWEN_TEXT_ENCODER, "vae": QWEN_VAE},
    "flux2": {"transformer": FLUX2_TRANSFORMER, "text_encoder": FLUX2_TEXT_ENCODER, "vae": FLUX2_VAE},
}
COMPONENTS = ("text_encoder", "transformer", "vae")


def real_config(model_id: str, component: str) -> dict[str, Any]:
    """The released config of `component` of `model_id` (a copy: callers may edit it)."""
    from previewd.catalog import MODELS

    config = copy.deepcopy(REAL[MODELS[model_id].family][component])
    if model_id == "qwen_image_edit_plus_2511" and component == "transformer":
        config["zero_cond_t"] = True  # Qwen/Qwen-Image-Edit-2511 transformer/config.json
    return config


@contextmanager
def _default_dtype(dtype):
    # Built in the run dtype, not cast afterwards: diffusers warns about casts of built models.
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json read from disk, without the bookkeeping keys the constructors refuse."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures",)}


def build(family: str, component: str, config: dict[str, Any], dtype=None, device: str = "meta"):
    """`component` built from `config` in `dtype` (default float32) on `device`: on the meta device
    shapes without memory, elsewhere the library's random initialisation."""
    import torch

    with torch.device(device), _default_dtype(dtype or torch.float32):
        if component == "transformer":
            from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

            cls = QwenImageTransformer2DModel if family == "qwen" else Flux2Transformer2DModel
            return cls.from_config(_clean(config))
        if component == "vae":
            from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage

            cls = AutoencoderKLQwenImage if family == "qwen" else AutoencoderKLFlux2
            return cls.from_config(_clean(config))
        if family == "qwen":
            from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

            return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**_clean(config)))
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        return Mistral3ForConditionalGeneration(Mistral3Config(**_clean(config)))
