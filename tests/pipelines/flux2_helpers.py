"""Shared fixtures and helpers for the FLUX.2 adapter tests: the tiny model, LoRAs, golden cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from previewd.spec import AitkOptions, ControlImage, LoraSpec, ModelSource, RenderSpec

GOLDENS = Path(__file__).resolve().parents[3] / "shared" / "goldens"
PROFILE_DIR = {"aitk": "aitk", "reference": "ref"}
PROMPT = "a photo of a red fox sitting in fresh snow, golden hour"


@pytest.fixture(scope="session")
def flux2_loras(tmp_path_factory) -> Path:
    """Two checkpoints for the tiny FLUX.2 in ai-toolkit's format: lora_a (step 250), lora_b (500)."""
    from previewd.pipelines.tiny.flux2 import write_bfl_lora

    folder = tmp_path_factory.mktemp("flux2_loras")
    write_bfl_lora(folder / "lora_a.safetensors", seed=1, step=250)
    write_bfl_lora(folder / "lora_b.safetensors", seed=2, step=500)
    return folder


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from previewd.pipelines import create

    torch.set_num_threads(2)
    pipe = create("flux2", ModelSource(path=str(tiny_model("flux2"))), device="cpu", dtype="float32")
    pipe.load()
    yield pipe
    pipe.unload()


@pytest.fixture(scope="module")
def tiny_transformer():
    """The tiny FLUX.2 transformer, built in memory: enough for LoRA mapping and merging."""
    from diffusers import Flux2Transformer2DModel

    from previewd.pipelines.tiny.flux2 import TRANSFORMER

    torch.manual_seed(0)
    return Flux2Transformer2DModel(**TRANSFORMER).eval().requires_grad_(False)


def spec(**changes) -> RenderSpec:
    base = {"model": "flux2", "prompt": PROMPT, "width": 64, "height": 64, "sample_steps": 2}
    return RenderSpec(**{**base, **changes})


def pixels(result) -> np.ndarray:
    return np.asarray(result.image).astype(np.int16)


def golden_cases() -> list[tuple[str, str]]:
    """(profile, case_id) for every stored FLUX.2 case."""
    found = []
    for profile, folder in PROFILE_DIR.items():
        root = GOLDENS / "cases" / folder / "flux2"
        if root.is_dir():
            found += [(profile, d.name) for d in sorted(root.iterdir()) if (d / "request.json").is_file()]
    return found


def case_dir(profile: str, case_id: str) -> Path:
    return GOLDENS / "cases" / PROFILE_DIR[profile] / "flux2" / case_id


def case_specs(profile: str, case_id: str) -> tuple[str, list[RenderSpec]]:
    """(dtype, specs): the renders a case asks for, in order (switch sequences give two)."""
    request = json.loads((case_dir(profile, case_id) / "request.json").read_text())
    controls = tuple(ControlImage(slot=slot, path=str(GOLDENS / item["file"]))
                     for slot, item in request["control_images"].items())
    aitk = request.get("aitk", {})
    config = aitk.get("model_config", {})
    # ai-toolkit's FLUX.2 quantises its text encoder with `qtype` (aitk-quantized.md §4).
    qtype = config.get("qtype", "qfloat8")
    options = AitkOptions(lora_merged=not str(aitk.get("lora_application")).startswith("UNMERGED"),
                          quantize=config.get("quantize", False), qtype=qtype,
                          quantize_te=config.get("quantize_te", False), qtype_te=qtype)

    def one(lora_file, multiplier):
        lora = None if lora_file is None else LoraSpec(path=str(GOLDENS / lora_file), network_multiplier=multiplier)
        return RenderSpec(model="flux2", parity=profile, prompt=request["prompt"], neg=request["neg"],
                          width=request["width"], height=request["height"], seed=request["seed"],
                          sample_steps=request["steps"], guidance_scale=request["guidance"], lora=lora,
                          control_images=controls, aitk=options)

    if "switch" in request:
        steps = [request["switch"]["first"], request["switch"]["then"]]
        return request["dtype"], [one(s["lora"], s["scale"]) for s in steps]
    lora = request["lora"]
    return request["dtype"], [one(lora and lora["file"], lora["multiplier"] if lora else 1.0)]
