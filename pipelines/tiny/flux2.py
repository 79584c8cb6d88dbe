"""A tiny random-weight FLUX.2 in the diffusers layout, loadable offline by the `flux2` adapter.

Sizes follow the goldens' tiny model (../shared/goldens/README.md §3): a 32-wide DiT with one
double and one single block, the real 128 latent channels and 2x2-patch VAE (32 channels), and a
31-layer Mistral-3 text encoder so hidden states 10/20/30 exist. The tokenizer is a byte-level BPE
with Mistral's special tokens inside a PixtralProcessor (tiny-models-cpu.md §3), built in code
because no offline copy exists. Same `model_id` and folder -> bit-identical weights.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from previewd.fileio import mode_as_opened
from previewd.pipelines import _torchvision_compat

MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>")
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{%- else %}{%- set parts = message['content'] %}{%- endif %}"
    "{%- if message['role'] == 'system' %}[SYSTEM_PROMPT]{%- elif message['role'] == 'user' %}[INST]{%- endif %}"
    "{%- for p in parts %}{%- if p['type'] == 'text' %}{{- p['text'] }}{%- elif p['type'] == 'image' %}[IMG]"
    "{%- endif %}{%- endfor %}"
    "{%- if message['role'] == 'system' %}[/SYSTEM_PROMPT]{%- elif message['role'] == 'user' %}[/INST]"
    "{%- elif message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}{%- endfor %}"
)
TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 48, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}
VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1,
    "latent_channels": 32, "norm_num_groups": 32, "sample_size": 256, "patch_size": (2, 2),
}
TEXT_CONFIG = {
    "model_type": "mistral", "vocab_size": 272, "hidden_size": 16, "intermediate_size": 37,
    "max_position_embeddings": 2048, "num_attention_heads": 4, "num_hidden_layers": 31, "num_key_value_heads": 2,
    "head_dim": 4, "rms_norm_eps": 1e-5, "rope_theta": 1e9, "sliding_window": None,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 10,
}
VISION_CONFIG = {
    "model_type": "pixtral", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
    "intermediate_size": 37, "image_size": 64, "patch_size": 8, "num_channels": 3, "head_dim": 4,
}


def _seed(model_id: str, part: str) -> int:
    return zlib.crc32(f"{model_id}/{part}".encode())


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Seeded non-trivial norm scales and batch-norm statistics, as the goldens' model has, so that
    those code paths (QK norm, latent un-normalisation) change pixels in tests."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted({**dict(module.named_parameters()), **dict(module.named_buffers())}.items()):
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                tensor.copy_(3 * (1 + 0.1 * torch.randn(tensor.shape, generator=generator)))
            elif name == "bn.running_mean":
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name == "bn.running_var":
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))


def _processor():
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    _torchvision_compat.install()
    vocab = {token: index for index, token in enumerate(MISTRAL_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=list(MISTRAL_SPECIALS[3:10]), model_max_length=131072, padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    images = PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    return PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, spatial_merge_size=1,
                            chat_template=CHAT_TEMPLATE)


def build(model_id: str, out_dir: Path) -> None:
    """Write a tiny FLUX.2 pipeline folder (model_index.json + five components) to `out_dir`."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(_seed(model_id, "transformer"))
    transformer = Flux2Transformer2DModel(**TRANSFORMER)
    _perturb(transformer, _seed(model_id, "transformer-norms"))
    transformer.save_pretrained(out_dir / "transformer")

    torch.manual_seed(_seed(model_id, "vae"))
    vae = AutoencoderKLFlux2(**VAE)
    _perturb(vae, _seed(model_id, "vae-bn"))
    vae.save_pretrained(out_dir / "vae")

    torch.manual_seed(_seed(model_id, "text_encoder"))
    config = Mistral3Config(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, bos_token_id=1, eos_token_id=2,
                            pad_token_id=10, image_token_index=7, vision_feature_layer=-1, spatial_merge_size=1)
    Mistral3ForConditionalGeneration(config).eval().save_pretrained(out_dir / "text_encoder")
    _processor().save_pretrained(out_dir / "tokenizer")

    # Saved for layout completeness only; previewd samples with ai-toolkit's schedule, not this.
    FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                    base_image_seq_len=256, max_image_seq_len=4096, shift=3.0
                                    ).save_pretrained(out_dir / "scheduler")
    index = {
        "_class_name": "Flux2Pipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
        "tokenizer": ["transformers", "PixtralProcessor"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def bfl_lora_shapes(config: dict = TRANSFORMER) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear ai-toolkit wraps in a FLUX.2 LoRA, by BFL module name."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = int(dim * config["mlp_ratio"])
    shapes = {}
    for block in range(config["num_layers"]):
        for stream in ("img", "txt"):
            shapes[f"double_blocks.{block}.{stream}_attn.qkv"] = (3 * dim, dim)
            shapes[f"double_blocks.{block}.{stream}_attn.proj"] = (dim, dim)
            shapes[f"double_blocks.{block}.{stream}_mlp.0"] = (2 * mlp, dim)
            shapes[f"double_blocks.{block}.{stream}_mlp.2"] = (dim, mlp)
    for block in range(config["num_single_layers"]):
        shapes[f"single_blocks.{block}.linear1"] = (3 * dim + 2 * mlp, dim)
        shapes[f"single_blocks.{block}.linear2"] = (dim, dim + mlp)
    return shapes


def write_bfl_lora(path: Path, *, seed: int, rank: int = 4, scale: float = 1.5, step: int | None = None) -> Path:
    """A LoRA for the tiny model in ai-toolkit's FLUX.2 file format (`diffusion_model.` + BFL names,
    lora_A/lora_B, no alpha, bf16). lora_B is non-zero so the checkpoint visibly changes pixels."""
    generator = torch.Generator("cpu").manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(bfl_lora_shapes().items()):
        tensors[f"diffusion_model.{module}.lora_A.weight"] = (
            torch.randn(rank, in_features, generator=generator) / in_features ** 0.5).to(torch.bfloat16)
        tensors[f"diffusion_model.{module}.lora_B.weight"] = (
            torch.randn(out_features, rank, generator=generator) * scale / rank ** 0.5).to(torch.bfloat16)
    metadata = {"format": "pt", "ss_base_model_version": "flux2"}
    if step is not None:
        metadata["training_info"] = json.dumps({"step": step, "epoch": 0})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    mode_as_opened(path)
    return path
