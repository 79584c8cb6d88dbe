"""Tiny random-weight Qwen-Image pipelines in the diffusers folder layout, for CPU tests.

`build(model_id, out_dir)` writes a folder that the adapters load exactly like real weights
(`from_pretrained(folder, local_files_only=True)`). Shapes follow tiny-models-cpu.md §3-4: a
2-layer transformer, the "x8" VAE (8x spatial like the real one), a 2-layer Qwen2.5-VL text encoder
with a vision tower, and an offline byte-level tokenizer (+ Qwen2VLProcessor for the edit models).

Weights are seeded, so a build is deterministic. At default init the prompt, CFG and control
images move pixels by less than one 8-bit level, which would hide real differences; like the
goldens' models, a few layers are scaled up ("sensitization") so conditioning visibly matters.
`write_random_lora` writes checkpoints for such a folder in ai-toolkit's file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from previewd.fileio import mode_as_opened

SEEDS = {"qwen_image": 2512, "qwen_image_2512": 2512, "qwen_image_edit": 1001,
         "qwen_image_edit_plus": 2509, "qwen_image_edit_plus_2511": 2511}

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

TRANSFORMER = {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 2, "attention_head_dim": 16,
               "num_attention_heads": 3, "joint_attention_dim": 16, "guidance_embeds": False,
               "axes_dims_rope": [8, 4, 4]}
VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1,
       "temperal_downsample": [False, True, True]}
TEXT_ENCODER = {
    "text_config": {"vocab_size": 272, "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 2,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
                    "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 256},
    "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
                      "fullatt_block_indexes": [1]},
    "image_token_id": 262, "video_token_id": 263, "vision_start_token_id": 259, "vision_end_token_id": 260,
}
# ai-toolkit's Qwen scheduler config, which is also the Qwen/Qwen-Image hub config.
SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
             "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "time_shift_type": "exponential",
             "use_dynamic_shifting": True}


def _tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in QWEN_SPECIALS:
        vocab.setdefault(token, len(vocab))
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=QWEN_SPECIALS[1:],
                          model_max_length=32768)


def _perturb_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norm weights default to exactly 1 (and biases to 0); noise makes them carry signal."""
    for _name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                param.data.add_(0.1 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def _sensitize_transformer(transformer, generator: torch.Generator) -> None:
    _perturb_norms(transformer, generator)
    for block in transformer.transformer_blocks:
        attn = block.attn
        for norm in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k):
            norm.weight.mul_(3)
        attn.add_v_proj.weight.mul_(3)
    transformer.proj_out.weight.mul_(3)


def build(model_id: str, out_dir: Path) -> None:
    """Write the tiny pipeline for `model_id` into `out_dir` (created if missing)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if model_id not in SEEDS:
        raise ValueError(f"no tiny Qwen model for {model_id!r} (known: {', '.join(SEEDS)})")
    seed = SEEDS[model_id]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    perturb = torch.Generator("cpu").manual_seed(seed + 7)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(**TRANSFORMER, zero_cond_t=model_id.endswith("2511")).eval()
    _sensitize_transformer(transformer, perturb)

    stats = torch.Generator("cpu").manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        **VAE,
        latents_mean=[round(v, 4) for v in (0.3 * torch.randn(4, generator=stats)).tolist()],
        latents_std=[round(v, 4) for v in (1.0 + 0.3 * torch.rand(4, generator=stats)).tolist()],
    ).eval()
    with torch.no_grad():
        _perturb_norms(vae, perturb)
        vae.decoder.conv_out.weight.mul_(2)

    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**TEXT_ENCODER)).eval()
    with torch.no_grad():
        _perturb_norms(text_encoder, perturb)

    tokenizer = _tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    parts = dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 transformer=transformer)
    if model_id in ("qwen_image", "qwen_image_2512"):
        pipe = QwenImagePipeline(**parts)
    else:
        from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                     video_processor=Qwen2VLVideoProcessor())
        cls = QwenImageEditPipeline if model_id == "qwen_image_edit" else QwenImageEditPlusPipeline
        pipe = cls(processor=processor, **parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "TINY_BUILD.json").write_text(json.dumps(
        {"builder": "previewd.pipelines.tiny.qwen.build", "model_id": model_id, "seed": seed,
         "note": "random weights, sensitized; for tests only"}, indent=2) + "\n")


def write_random_lora(model_dir: Path, path: Path, *, seed: int, step: int | None = None, rank: int = 4,
                      scale: float = 0.8) -> Path:
    """A LoRA over every Linear in the Qwen transformer blocks, in ai-toolkit's saved format.

    Keys are `diffusion_model.<module>.lora_A/lora_B.weight` with no alpha, bf16, and a
    `training_info` header like ai-toolkit writes. lora_B is non-zero (ai-toolkit initialises
    it to zero, which would render the base image) so each checkpoint visibly changes pixels.
    """
    weights = model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    with safe_open(str(weights), framework="pt") as handle:
        for key in sorted(handle.keys()):
            if not key.startswith("transformer_blocks.") or not key.endswith(".weight"):
                continue
            shape = handle.get_slice(key).get_shape()
            if len(shape) != 2:
                continue
            module = key[: -len(".weight")]
            out_features, in_features = shape
            tensors[f"diffusion_model.{module}.lora_A.weight"] = (
                torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(torch.bfloat16)
            tensors[f"diffusion_model.{module}.lora_B.weight"] = (
                torch.randn(out_features, rank, generator=generator) * scale / rank**0.5).to(torch.bfloat16)
    metadata = {"format": "pt", "software": json.dumps({"name": "previewd tiny-models"})}
    if step is not None:
        metadata["training_info"] = json.dumps({"step": step, "epoch": 0})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    mode_as_opened(path)
    return path
