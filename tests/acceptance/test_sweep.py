"""A sweep request (3 checkpoints × 3 strengths) through `previewd render` on the tiny Qwen-Image:
nine images, a manifest whose layout is checkpoint × strength, and a grid.png with those axes."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from previewd.instance import render_config
from previewd.outbox import grid as grids, read_manifest, table

pytestmark = pytest.mark.slow


def test_three_checkpoints_by_three_strengths(tmp_path: Path, tiny_model) -> None:
    from previewd.pipelines.tiny.qwen import write_random_lora

    tiny = tiny_model("qwen_image_2512")
    config = tmp_path / "config.yaml"
    config.write_text(render_config(tiny_models_dir=str(tiny.parent)))
    run = tmp_path / "my_run"
    for n, step in enumerate((250, 500, 750)):
        write_random_lora(tiny, run / f"my_run_{step:09d}.safetensors", seed=n, step=step)
    request = tmp_path / "sweep.yaml"
    request.write_text("model: qwen_image_2512\nprompts:\n  - prompt: a lighthouse at dusk\n    width: 64\n"
                       "    height: 64\n    sample_steps: 2\nnetwork_multipliers: [0.5, 1.0, 1.5]\nloras:\n" +
                       "".join(f"  - path: my_run/my_run_{step:09d}.safetensors\n" for step in (250, 500, 750)))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "previewd", "render", "-c", str(config), str(request),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    images = sorted(p.name for p in out.glob("*.png") if p.name != "grid.png")
    assert images == sorted(f"{step:09d}_00_m{m}.png" for step in (250, 500, 750) for m in ("0.5", "1", "1.5"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == {"rows": "checkpoint", "columns": ["strength"]}
    assert [c["step"] for c in manifest["checkpoints"]] == [250, 500, 750]
    assert manifest["strengths"] == [0.5, 1.0, 1.5]
    assert sorted((r["axes"]["checkpoint"], r["axes"]["strength"]) for r in manifest["renders"]) == sorted(
        (f"my_run_{step:09d}.safetensors", m) for step in (250, 500, 750) for m in (0.5, 1.0, 1.5))
    schema = json.loads(resources.files("previewd").joinpath("manifest.schema.json").read_text())
    jsonschema.validate(manifest, schema)

    # grid.png: rows are the checkpoints, columns the strengths, every tile painted.
    model = read_manifest(out)
    laid_out = table.build(model)
    assert [h.label for h in laid_out.rows] == ["step 250", "step 500", "step 750"]
    assert [c.headers[0].label for c in laid_out.columns] == ["strength 0.5", "strength 1", "strength 1.5"]
    geo = grids.plan(laid_out, model, aitk_column=True)
    with Image.open(out / "grid.png") as sheet:
        sheet = sheet.convert("RGB")
        assert sheet.size == geo.size
        for r in range(3):
            for c in range(3):
                x, y = geo.tiles[(r, c, 0)]
                tile = sheet.crop((x, y, x + geo.tile, y + geo.tile))
                assert tile.getextrema() != ((255, 255), (255, 255), (255, 255)), (r, c)
    with Image.open(out / "000000500_00_m1.5.png") as image:
        assert "Lora: my_run_000000500, Lora strength: 1.5" in image.text["parameters"]
