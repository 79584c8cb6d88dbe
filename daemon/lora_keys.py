"""The tensor names a LoRA file may hold, torch-free: intake checks a checkpoint's header with
them before anything is queued, and previewd.pipelines.lora reads the tensors by them."""

from __future__ import annotations

import re

LORA_WEIGHT = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight$")
LORA_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
UNSUPPORTED_TAGS = ("lokr_", "hada_", "dora_scale", ".oft_", "lora_mid")
"""LoKr, LoHa, DoRA, OFT and LoCon mid weights: diffusers applies plain LoRA only."""
