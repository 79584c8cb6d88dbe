import io
import json
import os
import stat
from pathlib import Path

from PIL import Image, ImageChops

from previewd import outbox
from previewd.manifest import PlannedCell, RenderEntry
from previewd.outbox import grid as grids, table
from previewd.outbox.folder import CellOp, Folder, RenderOp
from previewd.spec import LoraSpec, RenderSpec
from previewd.tasks import OutputTarget, RenderTask, image_name


def _target(out_dir: Path, step, index, checkpoint=None, **extra) -> OutputTarget:
    checkpoint = checkpoint or f"run_{step:09d}.safetensors"
    name = image_name(step, checkpoint, index, "png", strength=extra.get("strength"), seed=extra.get("seed"))
    return OutputTarget(out_dir=str(out_dir), image_name=name, title="run", source=str(out_dir / "config.yaml"),
                        checkpoint=checkpoint, step=step, prompt_index=index, **extra)


def _entry(index: int, seed: int = 42, **overrides) -> RenderEntry:
    return RenderEntry(**{"model": "qwen_image_2512", "checkpoint": "x", "step": None, "prompt_index": index,
                          "prompt": f"prompt {index}", "neg": "", "seed": seed, "width": 64, "height": 64,
                          "sample_steps": 3, "guidance_scale": 4.0, "network_multiplier": 1.0, "parity": "aitk",
                          **overrides})


def _write(out_dir, step, index, colour, seed=42, size=64, sweep_seed=None, **kw):
    target = _target(out_dir, step, index, seed=sweep_seed, **kw)
    entry = _entry(index, seed, step=step, checkpoint=target.checkpoint, width=size, height=size)
    return outbox.write_render(target, Image.new("RGB", (size, size), colour), entry, wait=True)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_manifest_lists_each_render_once_and_is_sorted(tmp_path):
    _write(tmp_path, 500, 1, "red")
    _write(tmp_path, 250, 0, "green")
    _write(tmp_path, 250, 1, "blue")
    _write(tmp_path, 500, 1, "white", seed=7)  # a re-run of the same render replaces it
    manifest = _manifest(tmp_path)
    assert manifest["version"] == 2
    assert [(r["step"], r["prompt_index"]) for r in manifest["renders"]] == [(250, 0), (250, 1), (500, 1)]
    assert manifest["renders"][-1]["seed"] == 7
    assert [c["step"] for c in manifest["checkpoints"]] == [250, 500]
    assert [p["index"] for p in manifest["prompts"]] == [0, 1]
    assert manifest["layout"] == {"rows": "checkpoint", "columns": ["prompt"]}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_the_render_thread_writes_only_the_image(tmp_path):
    writer = outbox.OutboxWriter(debounce=60)
    target = _target(tmp_path, 250, 0)
    entry = outbox.write_image(target, Image.new("RGB", (64, 64)), _entry(0))
    writer.submit(tmp_path, RenderOp(target, entry, Image.new("RGB", (64, 64))))
    assert (tmp_path / "000000250_00.png").is_file() and not (tmp_path / "manifest.json").exists()
    writer.flush()
    assert [r["image"] for r in _manifest(tmp_path)["renders"]] == ["000000250_00.png"]


def test_png_carries_the_render_record_and_a1111_parameters(tmp_path):
    target = _target(tmp_path, 250, 0)
    entry = _entry(0, step=250, checkpoint=target.checkpoint, neg="blurry", checkpoint_sha256="ab" * 32,
                   network_multiplier=0.75)
    outbox.write_render(target, Image.new("RGB", (64, 64)), entry, wait=True)
    with Image.open(tmp_path / "000000250_00.png") as image:
        record = json.loads(image.text["previewd"])
        parameters = image.text["parameters"]
    assert record["prompt"] == "prompt 0" and record["step"] == 250 and record["image"] == "000000250_00.png"
    prompt, negative, settings = parameters.split("\n")
    assert prompt == "prompt 0" and negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 3, Sampler: FlowMatchEuler, CFG scale: 4, Seed: 42, Size: 64x64, "
                               "Model: qwen_image_2512, Lora: run_000000250, Lora strength: 0.75, "
                               'Lora hashes: "run_000000250: abababababab"')


def test_manifest_paths_are_relative_to_the_folder(tmp_path):
    out = tmp_path / "run" / "previews"
    target = _target(out, 250, 0).model_copy(update={"source": str(tmp_path / "run" / "config.yaml"),
                                                     "job_dir": str(tmp_path / "run")})
    entry = _entry(0, step=250, checkpoint=target.checkpoint, source=target.source,
                   record={"lora": {"path": str(tmp_path / "state" / "checkpoints" / "abc.safetensors"),
                                    "mode": "merged"}})
    outbox.write_render(target, Image.new("RGB", (64, 64)), entry, wait=True)
    manifest = _manifest(out)
    assert manifest["source"] == "../config.yaml" and manifest["job_dir"] == ".."
    [render] = manifest["renders"]
    assert render["source"] == "../config.yaml"
    assert render["record"]["lora"] == {"path": "../../state/checkpoints/abc.safetensors", "mode": "merged"}
    assert str(tmp_path) not in (out / "manifest.json").read_text()


def test_every_file_in_the_outbox_has_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        run = tmp_path / "run"
        (run / "samples").mkdir(parents=True)
        Image.new("RGB", (64, 64), "green").save(run / "samples" / "1__000000250_0.png")
        target = _target(run / "previews", 250, 0).model_copy(update={"job_dir": str(run)})
        outbox.write_render(target, Image.new("RGB", (64, 64)), _entry(0, step=250, checkpoint=target.checkpoint),
                            wait=True)
        task = RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt="p"), target=_target(run / "previews", 500, 0))
        outbox.record_cell(task, job_id=3, error="boom")
        outbox.flush()
    finally:
        os.umask(previous)
    files = [p for p in (run / "previews").rglob("*")]
    names = {p.relative_to(run / "previews").as_posix() for p in files}
    assert {".manifest.lock", "000000250_00.png", "manifest.json", "manifest.js", "index.html", "grid.png",
            ".thumbs/000000250_00.png.jpg", ".thumbs/000000250_00.png.aitk.jpg"} <= names
    for path in files:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), f"{path}: {oct(mode)}"


def test_grid_has_a_row_per_checkpoint_and_a_column_per_prompt(tmp_path):
    _write(tmp_path, 250, 0, "green")
    _write(tmp_path, 250, 1, "blue")
    _write(tmp_path, 500, 0, "red")
    manifest = outbox.read_manifest(tmp_path)
    geo = grids.plan(table.build(manifest), manifest, aitk_column=True)
    assert geo.tile == 64 and geo.slots == 1
    with Image.open(tmp_path / "grid.png") as grid:
        grid = grid.convert("RGB")
        assert grid.size == geo.size

        def centre(r, c):
            x, y = geo.tiles[(r, c, 0)]
            return grid.getpixel((x + 32, y + 32))

        # Tiles are thumbnails of the renders: the centre of each cell has the render's colour.
        assert centre(0, 0) == (0, 128, 0) and centre(0, 1) == (0, 0, 255) and centre(1, 0) == (255, 0, 0)
        assert centre(1, 1) == (255, 255, 255)  # not rendered


def test_grid_labels_wrap_and_never_overlap():
    fnt = grids.font(10)
    lines = grids.wrap("a photo of zx9 standing on a very long bridge at sunset, cinematic", fnt, 64)
    assert len(lines) > 3 and all(fnt.getlength(line) <= 64 for line in lines)
    assert " ".join(lines) == "a photo of zx9 standing on a very long bridge at sunset, cinematic"
    assert all(fnt.getlength(line) <= 30 for line in grids.wrap("supercalifragilistic", fnt, 30))


def test_long_prompts_go_to_the_legend_whole(tmp_path):
    prompt = " ".join(f"word{i}" for i in range(60))
    target = _target(tmp_path, 250, 0)
    outbox.write_render(target, Image.new("RGB", (64, 64)),
                        _entry(0, step=250, checkpoint=target.checkpoint, prompt=prompt), wait=True)
    manifest = outbox.read_manifest(tmp_path)
    geo = grids.plan(table.build(manifest), manifest, aitk_column=True)
    texts = [t for _x, _y, t, _c in geo.texts]
    assert "#0" in texts  # the column says which prompt; the legend has it in full, wrapped
    legend = " ".join(t for t in texts if t.startswith(("#0:", "word")))
    assert prompt in legend.replace("#0: ", "")
    boxes = [(x, y) for x, y, _t, _c in geo.texts]
    assert len(boxes) == len(set(boxes))


def test_grid_pastes_one_tile_per_render_and_reframes_only_when_rows_or_columns_change(tmp_path, monkeypatch):
    frames = []
    real = grids._frame
    monkeypatch.setattr(grids, "_frame", lambda geo: frames.append(geo) or real(geo))
    folder = Folder(tmp_path)

    def colour(step, index):
        return Image.new("RGB", (64, 64), (step % 256, index * 60, 0))

    # The dispatcher records a checkpoint's cells as it queues them: the layout is known up front.
    folder.fold([CellOp(_target(tmp_path, 250, i), PlannedCell(image=_target(tmp_path, 250, i).image_name,
                                                               checkpoint="run_000000250.safetensors", step=250,
                                                               prompt_index=i, prompt=f"prompt {i}", seed=42,
                                                               width=64, height=64), failed=False)
                 for i in range(3)], final=True)
    for step in (250, 500):
        for index in range(3):
            target = _target(tmp_path, step, index)
            entry = outbox.write_image(target, colour(step, index), _entry(index, step=step, checkpoint=target.checkpoint))
            folder.fold([RenderOp(target, entry, colour(step, index))], final=True)
    # Frames: the planned layout, the title once the first render names the model, the new row.
    # Every other render was pasted into the sheet as it was.
    assert len(frames) == 3
    manifest = outbox.read_manifest(tmp_path)
    fresh = grids.GridPainter().paint(table.build(manifest), manifest, lambda e, s: folder._thumb(e, s, {}),
                                      aitk_column=True)
    with Image.open(tmp_path / "grid.png") as painted, Image.open(io.BytesIO(fresh)) as reference:
        # The same picture, up to the JPEG thumbnails the fresh painting read back from disk.
        difference = ImageChops.difference(painted.convert("RGB"), reference.convert("RGB"))
        assert max(high for _low, high in difference.getextrema()) <= 4


def test_page_and_data_show_renders_and_aitk_samples_side_by_side(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    Image.new("RGB", (64, 64), (0, 120, 0)).save(samples / "1__000000250_0.png")
    target = _target(tmp_path / "previews", 250, 0).model_copy(update={"job_dir": str(tmp_path)})
    outbox.write_render(target, Image.new("RGB", (64, 64), (0, 128, 0)), _entry(0, step=250, checkpoint=target.checkpoint),
                        wait=True)
    [render] = _manifest(tmp_path / "previews")["renders"]
    assert render["aitk_sample"] == "../samples/1__000000250_0.png"
    assert render["aitk_sample_diff"]["max_abs_diff"] == 8
    page = (tmp_path / "previews" / "index.html").read_text()
    assert '<script src="manifest.js"></script>' in page and "http" not in page.replace("http-equiv", "")
    data = (tmp_path / "previews" / "manifest.js").read_text()
    assert data.startswith("previewdManifest(") and data.rstrip().endswith(");")
    cells = json.loads(data[len("previewdManifest("):-3])["cells"]
    assert cells == [[0, 0, {"s": "done", "image": "000000250_00.png", "thumb": ".thumbs/000000250_00.png.jpg",
                             "w": 64, "h": 64, "meta": "seed 42 · 64×64 · 3 steps · cfg 4 · strength 1 · aitk",
                             "aitk": "../samples/1__000000250_0.png",
                             "aitk_thumb": ".thumbs/000000250_00.png.aitk.jpg",
                             "note": cells[0][2]["note"]}]]
    with Image.open(tmp_path / "previews" / "grid.png") as grid:
        manifest = outbox.read_manifest(tmp_path / "previews")
        geo = grids.plan(table.build(manifest), manifest, aitk_column=True)
        assert geo.slots == 2 and grid.size == geo.size
        x, y = geo.tiles[(0, 0, 1)]
        assert grid.convert("RGB").getpixel((x + 32, y + 32)) == (0, 120, 0)


def test_compare_reports_size_mismatch(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "s.png")
    diff, _thumb = outbox.compare(Image.new("RGB", (64, 64)), tmp_path / "s.png")
    assert "size differs" in diff["error"]


def test_parity_gaps_reach_the_manifest_and_page(tmp_path):
    target = _target(tmp_path, 250, 0).model_copy(update={"parity_gaps": ("quantised <transformer>",)})
    outbox.write_render(target, Image.new("RGB", (64, 64)), _entry(0), wait=True)
    assert _manifest(tmp_path)["parity_gaps"] == ["quantised <transformer>"]
    assert "quantised <transformer>" in (tmp_path / "manifest.js").read_text()


def test_grid_stays_viewable_for_long_runs(tmp_path):
    folder = Folder(tmp_path)
    ops = []
    for step in range(1, 301):
        target = _target(tmp_path, step * 10, 0)
        image = Image.new("RGB", (512, 512), "red")
        ops.append(RenderOp(target, outbox.write_image(target, image, _entry(0, step=step * 10,
                                                                           checkpoint=target.checkpoint)), image))
    folder.fold(ops)
    with Image.open(tmp_path / "grid.png") as grid:
        # 300 rows: tiles shrink from 256 px to the 32 px floor instead of a 77k-pixel-tall sheet.
        assert 300 * 32 < grid.size[1] < 300 * (32 + grids.GAP) + 200 and grid.size[0] < 400


def test_samples_that_appear_after_our_render_are_paired_on_a_later_write(tmp_path):
    out = tmp_path / "previews"
    first = _target(out, 250, 0).model_copy(update={"job_dir": str(tmp_path)})
    outbox.write_render(first, Image.new("RGB", (64, 64), "green"), _entry(0, step=250, checkpoint=first.checkpoint),
                        wait=True)
    sample = tmp_path / "samples" / "9__000000250_0.png"
    sample.parent.mkdir()
    Image.new("RGB", (64, 64), "green").save(sample)
    target = _target(out, 500, 0).model_copy(update={"job_dir": str(tmp_path)})
    outbox.write_render(target, Image.new("RGB", (64, 64)), _entry(0, step=500, checkpoint=target.checkpoint),
                        wait=True)
    first = _manifest(out)["renders"][0]
    assert first["step"] == 250 and first["aitk_sample"] == "../samples/9__000000250_0.png"
    assert first["aitk_sample_diff"]["max_abs_diff"] == 0


def test_a_corrupt_manifest_is_set_aside_and_rebuilt_from_the_images(tmp_path):
    _write(tmp_path, 250, 0, "green")
    (tmp_path / "manifest.json").write_text('{"renders": [ truncated')
    _write(tmp_path, 500, 0, "green")
    assert [r["step"] for r in _manifest(tmp_path)["renders"]] == [250, 500]
    assert (tmp_path / "manifest.json.corrupt").read_text() == '{"renders": [ truncated'


def test_an_image_written_before_a_crash_is_taken_in_by_the_next_writer(tmp_path):
    target = _target(tmp_path, 250, 0)
    outbox.write_image(target, Image.new("RGB", (64, 64)), _entry(0, step=250, checkpoint=target.checkpoint))
    _write(tmp_path, 500, 0, "green")  # another process, later
    assert [r["image"] for r in _manifest(tmp_path)["renders"]] == ["000000250_00.png", "000000500_00.png"]


def test_queued_and_failed_cells_show_until_rendered(tmp_path):
    def task(step, index):
        return RenderTask(spec=RenderSpec(model="qwen_image_2512", prompt=f"p{index}", width=64, height=64,
                                          lora=LoraSpec(path="x.safetensors")),
                          target=_target(tmp_path, step, index))

    outbox.record_cell(task(250, 0), job_id=1)
    outbox.record_cell(task(250, 1), job_id=2)
    outbox.record_cell(task(500, 0), job_id=3, error="PipelineError: no weights")
    outbox.flush()
    manifest = _manifest(tmp_path)
    assert [c["image"] for c in manifest["pending"]] == ["000000250_00.png", "000000250_01.png"]
    assert [(c["image"], c["error"]) for c in manifest["failed"]] == [("000000500_00.png", "PipelineError: no weights")]
    assert [c["step"] for c in manifest["checkpoints"]] == [250, 500]
    data = (tmp_path / "manifest.js").read_text()
    assert '"s": "pending"' in data and "no weights" in data
    _write(tmp_path, 250, 0, "green")
    manifest = _manifest(tmp_path)
    assert [c["image"] for c in manifest["pending"]] == ["000000250_01.png"]
    assert [r["image"] for r in manifest["renders"]] == ["000000250_00.png"]


def test_a_sweep_lays_out_checkpoints_by_strength(tmp_path):
    for step in (250, 500, 750):
        for strength in (0.5, 1.0, 1.5):
            _write(tmp_path, step, 0, (step % 256, int(strength * 100), 0), strength=strength)
    manifest = _manifest(tmp_path)
    assert manifest["layout"] == {"rows": "checkpoint", "columns": ["strength"]}
    assert manifest["strengths"] == [0.5, 1.0, 1.5] and manifest["seeds"] == []
    assert {r["image"] for r in manifest["renders"]} == {
        f"{step:09d}_00_m{m:g}.png" for step in (250, 500, 750) for m in (0.5, 1.0, 1.5)}
    assert all(r["axes"]["strength"] == float(r["image"].split("_m")[1][:-4]) for r in manifest["renders"])
    grid = table.build(outbox.read_manifest(tmp_path))
    assert [h.label for h in grid.rows] == ["step 250", "step 500", "step 750"]
    assert [c.headers[0].label for c in grid.columns] == ["strength 0.5", "strength 1", "strength 1.5"]
    assert len(grid.cells) == 9


def test_one_checkpoint_swept_over_strengths_and_seeds_puts_strengths_in_rows(tmp_path):
    for strength in (0.5, 1.0):
        for seed in (1, 2, 3):
            for index in (0, 1):
                _write(tmp_path, 250, index, "red", seed=seed, sweep_seed=seed, strength=strength)
    layout = _manifest(tmp_path)["layout"]
    assert layout == {"rows": "strength", "columns": ["prompt", "seed"]}
    grid = table.build(outbox.read_manifest(tmp_path))
    assert len(grid.rows) == 2 and len(grid.columns) == 6 and len(grid.cells) == 12


def test_a_version_1_manifest_is_carried_over(tmp_path):
    old = _entry(0, step=250, checkpoint="run_000000250.safetensors", image="000000250_00.png",
                 source=str(tmp_path / "config.yaml")).model_dump(mode="json", exclude={"axes"})
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "title": "run", "source": str(tmp_path / "config.yaml"),
                                                        "renders": [old]}))
    _write(tmp_path, 500, 0, "green")
    manifest = _manifest(tmp_path)
    assert manifest["version"] == 2 and manifest["source"] == "config.yaml"
    assert [(r["image"], r["source"], r["axes"]["checkpoint"]) for r in manifest["renders"]] == [
        ("000000250_00.png", "config.yaml", "run_000000250.safetensors"),
        ("000000500_00.png", None, "run_000000500.safetensors")]
