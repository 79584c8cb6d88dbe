import json
from pathlib import Path

from PIL import Image

from previewd import outbox
from previewd.manifest import RenderEntry
from previewd.tasks import OutputTarget, image_name


def _target(out_dir: Path, step, index, checkpoint=None) -> OutputTarget:
    checkpoint = checkpoint or f"run_{step:09d}.safetensors"
    return OutputTarget(out_dir=str(out_dir), image_name=image_name(step, checkpoint, index, "png"), title="run",
                        source="config.yaml", checkpoint=checkpoint, step=step, prompt_index=index)


def _entry(index: int, seed: int = 42, **overrides) -> RenderEntry:
    return RenderEntry(**{"model": "qwen_image_2512", "checkpoint": "x", "step": None, "prompt_index": index,
            "prompt": f"prompt {index}", "neg": "", "seed": seed, "width": 64, "height": 64,
            "sample_steps": 3, "guidance_scale": 4.0, "network_multiplier": 1.0, "parity": "aitk",
                          **overrides})


def _write(out_dir, step, index, colour, seed=42, **kw):
    target = _target(out_dir, step, index, **kw)
    entry = _entry(index, seed, step=step, checkpoint=target.checkpoint)
    return outbox.write_render(target, Image.new("RGB", (64, 64), colour), entry)


def test_manifest_lists_each_render_once_and_is_sorted(tmp_path):
    _write(tmp_path, 500, 1, "red")
    _write(tmp_path, 250, 0, "green")
    _write(tmp_path, 250, 1, "blue")
    _write(tmp_path, 500, 1, "white", seed=7)  # a re-run of the same render replaces it
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(r["step"], r["prompt_index"]) for r in manifest["renders"]] == [(250, 0), (250, 1), (500, 1)]
    assert manifest["renders"][-1]["seed"] == 7
    assert [c["step"] for c in manifest["checkpoints"]] == [250, 500]
    assert [p["index"] for p in manifest["prompts"]] == [0, 1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_png_carries_the_render_record(tmp_path):
    entry = _write(tmp_path, 250, 0, "green")
    with Image.open(tmp_path / entry.image) as image:
        record = json.loads(image.text["previewd"])
    assert record["prompt"] == "prompt 0" and record["step"] == 250 and record["image"] == "000000250_00.png"


def test_grid_has_a_row_per_checkpoint_and_a_column_per_prompt(tmp_path):
    _write(tmp_path, 250, 0, "green")
    _write(tmp_path, 250, 1, "blue")
    _write(tmp_path, 500, 0, "red")
    with Image.open(tmp_path / "grid.png") as grid:
        grid = grid.convert("RGB")
        label_w, cell, label_h = 150, 64, 18  # cells fit the 64 px renders
        assert grid.size == (label_w + 2 * cell, label_h + 2 * (cell + 4))
        # Tiles are thumbnails of the renders: the centre of each cell has the render's colour.
        assert grid.getpixel((label_w + 32, label_h + 32)) == (0, 128, 0)
        assert grid.getpixel((label_w + cell + 32, label_h + 32)) == (0, 0, 255)
        assert grid.getpixel((label_w + 32, label_h + cell + 4 + 32)) == (255, 0, 0)
        assert grid.getpixel((label_w + cell + 32, label_h + cell + 4 + 32)) == (255, 255, 255)  # not rendered


def test_page_shows_renders_and_aitk_samples_side_by_side(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (64, 64), (0, 120, 0)).save(samples / "1__000000250_0.png")
    target = _target(tmp_path / "previews", 250, 0)
    entry = outbox.write_render(target, Image.new("RGB", (64, 64), (0, 128, 0)), _entry(0),
                                aitk_samples={(250, 0): samples / "1__000000250_0.png"})
    assert entry.aitk_sample == "../samples/1__000000250_0.png"
    assert entry.aitk_sample_diff["max_abs_diff"] == 8
    page = (tmp_path / "previews" / "index.html").read_text()
    assert "000000250_00.png" in page and "../samples/1__000000250_0.png" in page and "<script>" in page


def test_compare_reports_size_mismatch(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "s.png")
    assert "size differs" in outbox.compare(Image.new("RGB", (64, 64)), tmp_path / "s.png")["error"]


def test_parity_gaps_reach_the_manifest_and_page(tmp_path):
    target = _target(tmp_path, 250, 0).model_copy(update={"parity_gaps": ("quantised <transformer>",)})
    outbox.write_render(target, Image.new("RGB", (64, 64)), _entry(0))
    assert json.loads((tmp_path / "manifest.json").read_text())["parity_gaps"] == ["quantised <transformer>"]
    assert "quantised &lt;transformer&gt;" in (tmp_path / "index.html").read_text()


def test_grid_is_built_from_thumbnails_and_stays_viewable_for_long_runs(tmp_path):
    for step in range(1, 301):
        target = _target(tmp_path, step * 10, 0)
        outbox.write_render(target, Image.new("RGB", (512, 512), "red"), _entry(0, step=step * 10,
                            checkpoint=target.checkpoint), grid=step == 300, page=False)
    assert len(list((tmp_path / ".thumbs").iterdir())) == 1  # only written when the grid is
    with Image.open(tmp_path / "grid.png") as grid:
        # 300 rows: cells shrink from 256 px to the 32 px floor instead of a 77k-pixel-tall sheet.
        assert grid.size == (150 + 32, 18 + 300 * (32 + 4))


def test_samples_that_appear_after_our_render_are_paired_on_a_later_write(tmp_path):
    out = tmp_path / "previews"
    _write(out, 250, 0, "green")
    sample = tmp_path / "samples" / "9__000000250_0.png"
    sample.parent.mkdir()
    Image.new("RGB", (64, 64), "green").save(sample)
    target = _target(out, 500, 0)
    outbox.write_render(target, Image.new("RGB", (64, 64)), _entry(0, step=500, checkpoint=target.checkpoint),
                        aitk_samples={(250, 0): sample})
    first = json.loads((out / "manifest.json").read_text())["renders"][0]
    assert first["step"] == 250 and first["aitk_sample"] == "../samples/9__000000250_0.png"
    assert first["aitk_sample_diff"]["max_abs_diff"] == 0


def test_a_corrupt_manifest_is_set_aside_not_fatal(tmp_path):
    (tmp_path / "manifest.json").write_text('{"renders": [ truncated')
    _write(tmp_path, 250, 0, "green")
    assert [r["step"] for r in json.loads((tmp_path / "manifest.json").read_text())["renders"]] == [250]
    assert (tmp_path / "manifest.json.corrupt").read_text() == '{"renders": [ truncated'
