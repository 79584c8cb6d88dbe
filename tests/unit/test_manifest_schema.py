"""manifest.schema.json ships in the package, is what the model says, and accepts real manifests."""

import json
from importlib import resources

import jsonschema
from PIL import Image

from previewd import outbox
from previewd.manifest import Manifest, RenderEntry, json_schema
from previewd.spec import RenderSpec
from previewd.tasks import OutputTarget, RenderTask, image_name

SCHEMA = json.loads(resources.files("previewd").joinpath("manifest.schema.json").read_text())


def test_the_shipped_schema_is_the_models():
    assert SCHEMA == json.loads(json.dumps(json_schema())), \
        "regenerate it: python -m previewd.manifest > daemon/manifest.schema.json"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_real_manifests_validate(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 64), "green").save(run / "samples" / "1__000000250_0.png")
    for step, strength in ((250, 0.5), (250, 1.0), (500, 0.5)):
        checkpoint = f"run_{step:09d}.safetensors"
        target = OutputTarget(out_dir=str(run / "previews"), title="run", source=str(run / "config.yaml"),
                              image_name=image_name(step, checkpoint, 0, "png", strength=strength),
                              checkpoint=checkpoint, step=step, prompt_index=0, job_dir=str(run),
                              strength=strength, parity_gaps=("quantised transformer",))
        entry = RenderEntry(model="qwen_image_2512", checkpoint=checkpoint, step=step, prompt_index=0, prompt="p",
                            seed=42, width=64, height=64, sample_steps=3, guidance_scale=4.0,
                            network_multiplier=strength, parity="aitk", record={"lora": {"path": "/x"}},
                            timings={"render": 1.0}, versions={"previewd": "0.1.0"})
        outbox.write_render(target, Image.new("RGB", (64, 64)), entry)
    pending = OutputTarget(out_dir=str(run / "previews"), title="run", source=str(run / "config.yaml"),
                           image_name="000000750_00_m0.5.png", checkpoint="run_000000750.safetensors", step=750,
                           prompt_index=0, strength=0.5)
    outbox.record_cell(RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt="p"), target=pending), job_id=4)
    outbox.record_cell(RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt="p"),
                                  target=pending.model_copy(update={"image_name": "000000750_00_m1.png",
                                                                    "strength": 1.0})),
                       job_id=5, error="PipelineError: out of memory")
    outbox.flush()
    data = json.loads((run / "previews" / "manifest.json").read_text())
    assert data["renders"] and data["pending"] and data["failed"] and data["renders"][0]["aitk_sample"]
    jsonschema.validate(data, SCHEMA)
    assert Manifest.model_validate(data).layout.columns == ["strength"]
