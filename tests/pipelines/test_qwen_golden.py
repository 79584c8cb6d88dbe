"""previewd's Qwen renders against ai-toolkit's and the reference server's own renders.

Every Qwen case in ../shared/goldens must match output.png within 1/255 per channel on every
pixel (CPU, float32, 2 threads). Switch sequences (sNN_) render `switch.first` then `switch.then`
on one cached adapter. The 1-step case is refused before rendering: it would be a black image (a NaN sigma).
One adapter per model serves every case, as the daemon keeps its pipeline hot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from previewd.errors import PipelineError
from previewd.pipelines import create
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.qwen.adapter import AITK_SCHEDULER
from qwen_helpers import (GOLDENS, case_dtype, expected_png, golden_cases, golden_model, max_level_diff,
                          specs_for_case)

pytestmark = [pytest.mark.golden, pytest.mark.slow]
TOLERANCE = 1


def test_the_goldens_are_there():
    """../shared/goldens sits beside the repository (as in CI); without it nothing below would run."""
    assert len(golden_cases()) >= 60, f"expected the Qwen golden cases under {GOLDENS}"


@pytest.fixture(scope="module")
def adapters():
    """One adapter per (model, dtype, quantisation), kept across cases as the daemon keeps its pipeline."""
    torch.set_num_threads(2)
    made = {}

    def get(model_id, dtype, quantization):
        key = (model_id, dtype, quantization)
        if key not in made:
            made[key] = create(model_id, golden_model(model_id), device="cpu", dtype=dtype,
                               quantization=quantization)
        return made[key]

    yield get
    for adapter in made.values():
        adapter.unload()


@pytest.mark.parametrize("profile, model_id, case_id", golden_cases(), ids=lambda v: v)
def test_golden_case(adapters, profile, model_id, case_id):
    specs = specs_for_case(profile, model_id, case_id)
    adapter = adapters(model_id, case_dtype(profile, model_id, case_id),
                       Quantization.of(specs[-1], golden_model(model_id)))
    if "nan_edge" in case_id:
        with pytest.raises(PipelineError, match="1-step schedule ends on a NaN sigma"):
            adapter.render(specs[-1])
        return
    for spec in specs:
        result = adapter.render(spec)
    expected = expected_png(profile, model_id, case_id)
    assert (result.height, result.width) == expected.shape[:2]
    diff = max_level_diff(result.image, expected)
    assert diff <= TOLERANCE, f"{profile}/{model_id}/{case_id}: max diff {diff}/255"


def test_aitk_scheduler_matches_recorded_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    schedules = json.loads((GOLDENS / "schedules.json").read_text())["qwen_aitk"]
    for name, entry in schedules.items():
        steps = int(name.split("steps")[1])
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(AITK_SCHEDULER)
        mu = calculate_shift(entry["image_seq_len"], 256, 8192, 0.5, 0.9)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        expected = np.array([np.nan if s is None else s for s in entry["sigmas"]], dtype=np.float64)
        np.testing.assert_allclose(scheduler.sigmas.double().numpy(), expected, rtol=0, atol=1e-6,
                                   equal_nan=True, err_msg=name)
