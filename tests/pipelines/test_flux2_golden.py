"""previewd's flux2 renders against ai-toolkit's and the reference server's own renders.

Every FLUX.2 case in ../shared/goldens must match output.png within 2/255 per channel on every
pixel; switch sequences (sNN_) run both renders on one cached pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_helpers import GOLDENS, case_dir, case_specs, golden_cases, pixels
from previewd.pipelines import create
from previewd.pipelines.quantization import Quantization
from previewd.spec import ModelSource

pytestmark = [pytest.mark.golden, pytest.mark.slow]
TOLERANCE = 2


def test_the_goldens_are_there():
    """../shared/goldens sits beside the repository (as in CI); without it nothing below would run."""
    assert len(golden_cases()) >= 20, f"expected the FLUX.2 golden cases under {GOLDENS}"
_pipes: dict[tuple, object] = {}


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(2)
    yield _pipes
    for pipe in _pipes.values():
        pipe.unload()
    _pipes.clear()


SOURCE = ModelSource(path=str(GOLDENS / "models" / "flux2"))


def pipe_for(pipes, dtype: str, quantization: Quantization):
    """One pipeline per (dtype, quantisation), kept across cases as the daemon keeps its pipeline."""
    if (dtype, quantization) not in pipes:
        pipes[dtype, quantization] = create("flux2", SOURCE, device="cpu", dtype=dtype, quantization=quantization)
    return pipes[dtype, quantization]


@pytest.mark.parametrize(("profile", "case_id"), golden_cases(), ids=lambda v: v)
def test_matches_golden(pipes, profile, case_id):
    dtype, specs = case_specs(profile, case_id)
    pipe = pipe_for(pipes, dtype, Quantization.of(specs[-1], SOURCE))
    for spec in specs:
        result = pipe.render(spec)
    expected = np.asarray(Image.open(case_dir(profile, case_id) / "output.png").convert("RGB")).astype(np.int16)
    got = pixels(result)
    assert got.shape == expected.shape
    assert result.record["parity"] == profile
    diff = int(np.abs(got - expected).max())
    assert diff <= TOLERANCE, f"{profile}/{case_id}: max difference {diff}/255"
