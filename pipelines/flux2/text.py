"""FLUX.2 prompt encoding with the Mistral-3 text encoder, as ai-toolkit's Flux2Pipeline does it.

System + user chat messages, padded to 512 tokens, hidden states 10/20/30 stacked along the feature
axis; no attention mask reaches the transformer (flux2-sampler.md §1.4).
"""

from __future__ import annotations

import torch

SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on "
    "object relationships, object\nattribution and actions without speculation."
)
HIDDEN_LAYERS = (10, 20, 30)
MAX_LENGTH = 512


def chat_messages(prompt: str) -> list[dict]:
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::format_input (one prompt, no images)
    # Pixtral's processor counts [IMG] tokens and fails when truncation changes the count.
    text = prompt.replace("[IMG]", "")
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
        {"role": "user", "content": [{"type": "text", "text": text}]},
    ]


@torch.no_grad()
def encode_prompt(text_encoder, processor, prompt: str, *, device: torch.device | str,
                  dtype: torch.dtype) -> torch.Tensor:
    """(1, 512, 3 * hidden) prompt embeddings in `dtype` on `device`."""
    # Follows diffusers pipelines/flux2/pipeline_flux2.py::Flux2Pipeline._get_mistral_3_small_prompt_embeds
    inputs = processor.apply_chat_template(
        [chat_messages(prompt)], add_generation_prompt=False, tokenize=True, return_dict=True,
        return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LENGTH,
    )
    encoder_device = next(text_encoder.parameters()).device
    output = text_encoder(input_ids=inputs["input_ids"].to(encoder_device),
                          attention_mask=inputs["attention_mask"].to(encoder_device),
                          output_hidden_states=True, use_cache=False)
    stacked = torch.stack([output.hidden_states[k] for k in HIDDEN_LAYERS], dim=1)
    batch, layers, length, hidden = stacked.shape
    embeds = stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * hidden)
    return embeds.to(device=device, dtype=dtype)
