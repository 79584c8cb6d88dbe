"""Shared helpers for the Qwen adapter tests: golden cases as RenderSpecs, tiny models, diffs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from previewd.spec import AitkOptions, ControlImage, LoraSpec, ModelSource, RenderSpec

GOLDENS = Path(__file__).resolve().parents[3] / "shared" / "goldens"

QWEN_IDS = ("qwen_image_2512", "qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_plus_2511")
GOLDEN_MODEL_DIR = {"qwen_image_2512": "qwen_image", "qwen_image": "qwen_image"}
PROFILE_DIR = {"aitk": "aitk", "reference": "ref"}


def golden_model(model_id: str) -> ModelSource:
    return ModelSource(path=str(GOLDENS / "models" / GOLDEN_MODEL_DIR.get(model_id, model_id)))


def golden_cases(model_ids=QWEN_IDS) -> list[tuple[str, str, str]]:
    """(profile, model_id, case_id) for every stored Qwen case."""
    found = []
    for profile, folder in PROFILE_DIR.items():
        for model_id in model_ids:
            root = GOLDENS / "cases" / folder / model_id
            if root.is_dir():
                found += [(profile, model_id, d.name) for d in sorted(root.iterdir()) if d.is_dir()]
    return found


def case_dir(profile: str, model_id: str, case_id: str) -> Path:
    return GOLDENS / "cases" / PROFILE_DIR[profile] / model_id / case_id


def _lora(path: str, multiplier: float) -> LoraSpec:
    return LoraSpec(path=str(GOLDENS / path), network_multiplier=multiplier)


def specs_for_case(profile: str, model_id: str, case_id: str) -> list[RenderSpec]:
    """The renders a case needs, in order; the last one is compared with output.png."""
    request = json.loads((case_dir(profile, model_id, case_id) / "request.json").read_text())
    aitk = request.get("aitk", {})
    gen = aitk.get("generate_image_config", {})
    controls = tuple(ControlImage(slot=slot, path=str(GOLDENS / item["file"]), sha256=item.get("sha256"))
                     for slot, item in request.get("control_images", {}).items())
    config = aitk.get("model_config", {})
    base = dict(model=model_id, parity=profile, prompt=request["prompt"], neg=request["neg"],
                width=request["width"], height=request["height"], seed=request["seed"],
                sample_steps=request["steps"], guidance_scale=request["guidance"], control_images=controls,
                aitk=AitkOptions(do_cfg_norm=bool(gen.get("do_cfg_norm", False)),
                                 vae_tiling=bool(config.get("low_vram", False)),
                                 lora_merged=not str(aitk.get("lora_application")).startswith("UNMERGED"),
                                 **quantization_options(config)))
    switch = request.get("switch")
    if switch:
        return [RenderSpec(**base, lora=_lora(step["lora"], step["scale"]))
                for step in (switch["first"], switch["then"])]
    lora = request.get("lora")
    return [RenderSpec(**base, lora=_lora(lora["file"], lora["multiplier"]) if lora else None)]


def quantization_options(model_config: dict) -> dict:
    """AitkOptions fields for a case's recorded ai-toolkit `model:` settings (the ARA path is relative
    to the goldens, as it was to ai-toolkit's working directory)."""
    qtype, _, ara = model_config.get("qtype", "qfloat8").partition("|")
    return {"quantize": model_config.get("quantize", False), "qtype": qtype,
            "ara": str(GOLDENS / ara) if ara else None, "quantize_te": model_config.get("quantize_te", False),
            "qtype_te": model_config.get("qtype_te", "qfloat8")}


def case_dtype(profile: str, model_id: str, case_id: str) -> str:
    request = json.loads((case_dir(profile, model_id, case_id) / "request.json").read_text())
    return request.get("dtype", "float32")


def expected_png(profile: str, model_id: str, case_id: str) -> np.ndarray:
    with Image.open(case_dir(profile, model_id, case_id) / "output.png") as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def max_level_diff(image: Image.Image, expected: np.ndarray) -> int:
    got = np.asarray(image.convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape, f"size {got.shape} != {expected.shape}"
    return int(np.abs(got - expected).max())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)
