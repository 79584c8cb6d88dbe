"""`previewd tiny-models` output renders through the registry for every model id.

This is the path the daemon takes: `pipelines.create(id, ModelSource(folder))`, then `load` and
`render`, with the folder laid out like a real diffusers checkpoint.
"""

import numpy as np
import pytest
from PIL import Image

from previewd import pipelines
from previewd.catalog import MODELS
from previewd.spec import MODEL_IDS, ControlImage, ModelSource, RenderSpec


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> ControlImage:
    path = tmp_path_factory.mktemp("ctrl") / "ctrl.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return ControlImage(slot="ctrl_img_1", path=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_every_model_id_renders_from_its_tiny_folder(model_id, tiny_model, control):
    info = MODELS[model_id]
    controls = ()
    if info.control == "single":
        controls = (control.model_copy(update={"slot": "ctrl_img"}),)
    elif info.control == "multi":
        controls = (control,)
    spec = RenderSpec(model=model_id, prompt="a red fox", width=100, height=72, sample_steps=2, seed=3,
                      control_images=controls)
    pipeline = pipelines.create(model_id, ModelSource(path=str(tiny_model(model_id))), device="cpu", dtype="float32")
    pipeline.load()
    try:
        first = pipeline.render(spec)
        again = pipeline.render(spec)
        other = pipeline.render(spec.model_copy(update={"seed": 4}))
    finally:
        pipeline.unload()
    assert first.image.size == (96, 64) and (first.width, first.height) == (96, 64)
    assert first.seed == 3
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))
    assert not np.array_equal(np.asarray(first.image), np.asarray(other.image))
    assert first.record, "the render record must say how the image was made"


def test_unknown_model_id_is_a_config_error():
    from previewd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model id"):
        pipelines.create("sdxl", ModelSource(path="x"))


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_every_model_id_has_an_adapter_that_takes_it(model_id):
    adapter = pipelines.create(model_id, ModelSource(path="never-loaded"), device="cpu", dtype="float32")
    assert type(adapter) is pipelines.adapter_class(model_id) and adapter.model_id == model_id
