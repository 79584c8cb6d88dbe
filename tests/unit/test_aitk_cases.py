"""ai-toolkit runs read exactly as ai-toolkit reads them (issue 10): one test per case.

Every run is written the way ai-toolkit writes it: the job config, `[name]` replaced, dumped with
`yaml.dump(raw_config, allow_unicode=True)` in ai-toolkit's key order (it imports oyaml, so keys keep
their order) into `training_folder/<process name>/config.yaml`. Each test then reads it as the
daemon's intake does (read_job, then specs_for_checkpoint for a checkpoint of the run) and checks what
ai-toolkit's sampler would use: prompt text, negative prompt, seed, size, steps, guidance,
multiplier and control slots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from previewd.aitk_samples import find_samples
from previewd.catalog import MODELS, snap
from previewd.errors import IntakeError
from previewd.intake.aitoolkit import (is_checkpoint, is_job_config, checkpoint_step, parity_gaps, read_job,
                                       specs_for_checkpoint)
from previewd.intake.images import ControlImageStore
from previewd.spec import RenderSpec

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "aitk-examples"


# -- runs as ai-toolkit writes them -------------------------------------------------------------

def process(name: str | None = None, *, training_folder: str, arch: str = "qwen_image:2512",
            name_or_path: str = "Qwen/Qwen-Image-2512", trigger_word: str | None = None,
            **sample: Any) -> dict[str, Any]:
    """A process in the key order of ai-toolkit's UI job configs."""
    proc: dict[str, Any] = {"type": "diffusion_trainer", "training_folder": training_folder}
    if name is not None:
        proc["name"] = name
    proc["device"] = "cuda:0"
    if trigger_word is not None:
        proc["trigger_word"] = trigger_word
    proc["network"] = {"type": "lora", "linear": 16, "linear_alpha": 16}
    proc["save"] = {"dtype": "float16", "save_every": 250, "max_step_saves_to_keep": 4}
    proc["datasets"] = [{"folder_path": "/data/set", "caption_ext": "txt", "resolution": [512, 768, 1024]}]
    proc["train"] = {"batch_size": 1, "steps": 2000, "lr": 0.0001, "dtype": "bf16"}
    proc["model"] = {"name_or_path": name_or_path, "arch": arch, "quantize": False, "low_vram": False}
    proc["sample"] = {"sampler": "flowmatch", "sample_every": 250, "width": 1024, "height": 1024,
                      "neg": "", "seed": 42, "walk_seed": True, "guidance_scale": 4, "sample_steps": 25,
                      **sample}
    return proc


def write_run(job_name: str, *processes: dict[str, Any]) -> list[Path]:
    """Each process writes the whole job config into training_folder/<process name>/config.yaml."""
    raw = {"job": "extension", "config": {"name": job_name, "process": list(processes)},
           "meta": {"name": "[name]", "version": "1.0"}}
    raw = json.loads(json.dumps(raw).replace("[name]", job_name))  # toolkit/config.py:preprocess_config
    paths = []
    for proc in raw["config"]["process"]:
        folder = Path(proc["training_folder"]) / proc.get("name", job_name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(yaml.dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
        paths.append(folder / "config.yaml")
    return paths


def image(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 8), color).save(path)
    return path


def render(config_path: Path, tmp_path: Path, **read: Any) -> tuple[Any, list[tuple[int, RenderSpec]]]:
    """The daemon's intake of the run's first checkpoint: its job and the specs it queues."""
    job = read_job(config_path, **read)
    checkpoint = job.job_dir / f"{job.name}_000000250.safetensors"
    assert is_checkpoint(job, checkpoint) and checkpoint_step(job, checkpoint) == 250
    store = ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path])
    return job, specs_for_checkpoint(job, str(checkpoint), parity="aitk", resolve_image=store.resolve)


def params(spec: RenderSpec) -> tuple:
    return (spec.prompt, spec.neg, spec.seed, spec.width, spec.height, spec.sample_steps, spec.guidance_scale,
            spec.lora.network_multiplier if spec.lora else None, [c.slot for c in spec.control_images])


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A local Hugging Face cache holding the repos given to add()."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "snapshots" / "c0ffee").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("c0ffee")
        return repo / "snapshots" / "c0ffee"

    return add


# -- the nine rows ----------------------------------------------------------------------------------

def test_row1_run_folder_is_named_after_the_process_checkpoints_after_the_job(tmp_path):
    [config] = write_run("my_job", process("my_proc", training_folder=str(tmp_path / "output"),
                                           prompts=["a dog"]))
    assert config.parent.name == "my_proc"
    job, [(index, spec)] = render(config, tmp_path)
    assert job.name == "my_job"  # BaseSDTrainProcess.save: f"{self.job.name}{step_num}.safetensors"
    assert not is_checkpoint(job, config.parent / "my_proc_000000250.safetensors")
    assert checkpoint_step(job, config.parent / "my_job.safetensors", {"training_info": '{"step": 2000}'}) == 2000
    assert params(spec) == ("a dog", "", 42, 1024, 1024, 25, 4.0, 1.0, [])


def test_row2_each_process_folder_renders_its_own_process(tmp_path):
    out = str(tmp_path / "output")
    first, second = write_run(
        "job",
        process("t2i", training_folder=out, prompts=["first"], seed=1, width=512, height=768),
        process("edit", training_folder=out, arch="qwen_image_edit_plus:2511",
                name_or_path="Qwen/Qwen-Image-Edit-2511", seed=7, walk_seed=False, width=640, height=832,
                sample_steps=8, guidance_scale=2.5, network_multiplier=0.5,
                samples=[{"prompt": "second", "ctrl_img_1": str(image(tmp_path / "c1.png"))}]))
    job, [(_, spec)] = render(second, tmp_path)
    assert (job.process_index, job.model) == (1, "qwen_image_edit_plus_2511")
    assert params(spec) == ("second", "", 7, 640, 832, 8, 2.5, 0.5, ["ctrl_img_1"])
    job, [(_, spec)] = render(first, tmp_path)
    assert (job.process_index, job.model) == (0, "qwen_image_2512")
    assert params(spec) == ("first", "", 1, 512, 768, 25, 4.0, 1.0, [])


def test_row2_processes_previewd_cannot_tell_apart_are_refused(tmp_path):
    out = str(tmp_path / "output")
    config, _ = write_run("job", process(training_folder=out, prompts=["a"]),
                          process(training_folder=out, prompts=["b"]))
    with pytest.raises(IntakeError, match=r"processes \[0\], \[1\] all write into 'job'"):
        read_job(config)
    [config] = write_run("job2", process("named", training_folder=out, prompts=["a"]),
                         process("other", training_folder=str(tmp_path / "elsewhere"), prompts=["b"]))[:1]
    moved = tmp_path / "moved" / "config.yaml"
    moved.parent.mkdir()
    moved.write_text(config.read_text())
    with pytest.raises(IntakeError, match="none of the 2 processes writes into this folder 'moved'"):
        read_job(moved)


@pytest.mark.parametrize("where", ["section", "item", "blank"])
def test_row3_null_or_blank_neg_is_the_text_None(tmp_path, where):
    sample = ({"neg": None, "prompts": ["a cat"]} if where == "section"
              else {"samples": [{"prompt": "a cat", "neg": None}]})
    [config] = write_run("job", process("job", training_folder=str(tmp_path), **sample))
    if where == "blank":  # a hand-edited `neg:` with nothing after it
        config.write_text(config.read_text().replace("neg: null", "neg:"))
    job, [(_, spec)] = render(config, tmp_path)
    assert params(spec) == ("a cat", "None", 42, 1024, 1024, 25, 4.0, 1.0, [])
    assert any('negative prompt "None"' in w for w in job.warnings)


def test_row4_ctrl_img_with_explicit_null_ctrl_img_1_is_encoded_twice(tmp_path):
    picture = image(tmp_path / "refs" / "x.png")
    [config] = write_run("job", process(
        "job", training_folder=str(tmp_path), arch="qwen_image_edit_plus", name_or_path="Qwen/Qwen-Image-Edit-2509",
        samples=[{"prompt": "edit it", "ctrl_img": str(picture), "ctrl_img_1": None}]))
    _, [(_, spec)] = render(config, tmp_path)
    assert params(spec) == ("edit it", "", 42, 1024, 1024, 25, 4.0, 1.0, ["ctrl_img", "ctrl_img_1"])
    assert spec.control_images[0].sha256 == spec.control_images[1].sha256


def test_row5_empty_samples_beside_prompts_samples_nothing(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), prompts=["never"], samples=[]))
    job, renders = render(config, tmp_path)
    assert job.samples == () and renders == []
    assert any("samples: empty: ai-toolkit samples nothing" in w for w in job.warnings)


def test_row6_multiplier_written_as_text_is_converted(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), network_multiplier="0.8",
                                        samples=[{"prompt": "a"}, {"prompt": "b", "network_multiplier": "1.2"},
                                                 {"prompt": "c", "network_multiplier": "strong"}]))
    job, renders = render(config, tmp_path)
    assert [params(spec) for _, spec in renders] == [
        ("a", "", 42, 1024, 1024, 25, 4.0, 0.8, []), ("b", "", 43, 1024, 1024, 25, 4.0, 1.2, []),
        ("c", "", 44, 1024, 1024, 25, 4.0, 1.0, [])]  # SampleItem falls back to 1.0
    assert any("samples[2].network_multiplier: 'strong' is not a number" in w for w in job.warnings)


def test_row6_text_where_ai_toolkit_crashes_is_one_error_not_one_per_prompt(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), width="1024",
                                        prompts=["a", "b", "c"]))
    with pytest.raises(IntakeError) as err:
        read_job(config)
    assert err.value.problems == [
        "config.process[0].sample.width: Value error, expected a number of pixels (ai-toolkit's sampler crashes "
        "on anything else) (got '1024')"]


def test_row6_other_coercions_follow_ai_toolkit(tmp_path):
    # torch.manual_seed int()s a seed (text works, and text -1 is never the random -1); sizes are
    # floored with `v - v % 8`, so a float size works too.
    [config] = write_run("job", process("job", training_folder=str(tmp_path), walk_seed=False, seed="-1",
                                        width=700.9, samples=[{"prompt": "a"}, {"prompt": "b", "seed": "12"}]))
    _, renders = render(config, tmp_path)
    assert [params(spec) for _, spec in renders] == [("a", "", 2**64 - 1, 696, 1024, 25, 4.0, 1.0, []),
                                                     ("b", "", 12, 696, 1024, 25, 4.0, 1.0, [])]
    [config] = write_run("job", process("job", training_folder=str(tmp_path), seed="42", sample_steps=25.0,
                                        prompts=["a"]))
    with pytest.raises(IntakeError) as err:
        read_job(config)
    assert [p.split(": ")[0] for p in err.value.problems] == ["config.process[0].sample.seed",
                                                              "config.process[0].sample.sample_steps"]
    assert "cannot walk" in err.value.problems[0] and "whole number" in err.value.problems[1]


@pytest.mark.parametrize("fmt", ["jpeg", "JPG"])
def test_row7_sample_format_is_the_extension_as_written(tmp_path, fmt):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), format=fmt, prompts=["a"]))
    job, [(_, spec)] = render(config, tmp_path)
    assert job.sample_format == fmt and params(spec)[0] == "a"
    image(job.job_dir / "samples" / f"1724085406830__000000250_0.{fmt}")
    assert find_samples(job.job_dir) == {(250, 0): job.job_dir / "samples" / f"1724085406830__000000250_0.{fmt}"}


def test_row8_qwen_image_ignores_leftover_numbered_control_images(tmp_path):
    left = str(image(tmp_path / "left.png"))
    [config] = write_run("job", process("job", training_folder=str(tmp_path), arch="qwen_image",
                                        name_or_path="Qwen/Qwen-Image",
                                        samples=[{"prompt": "a", "ctrl_img_1": left, "ctrl_img_3": left}]))
    job, [(_, spec)] = render(config, tmp_path)
    assert params(spec) == ("a", "", 42, 1024, 1024, 25, 4.0, 1.0, [])
    assert any("ctrl_img_1, ctrl_img_3 ignored: ai-toolkit's qwen_image model" in w for w in job.warnings)

    [config] = write_run("job", process("job", training_folder=str(tmp_path), arch="qwen_image",
                                        name_or_path="Qwen/Qwen-Image", samples=[{"prompt": "a", "ctrl_img": left}]))
    with pytest.raises(IntakeError, match="raises NotImplementedError for `ctrl_img`"):
        read_job(config)


def test_row9_seed_flag_minus_one_is_a_fixed_seed(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), seed=-1, walk_seed=False,
                                        prompts=["a --seed -1", "b", "c --seed -3"]))
    _, renders = render(config, tmp_path)
    # torch.manual_seed reads -1 as 2**64 - 1; only the section's -1 is drawn at random.
    assert [spec.seed for _, spec in renders] == [2**64 - 1, -1, 2**64 - 3]
    assert params(renders[0][1]) == ("a", "", 2**64 - 1, 1024, 1024, 25, 4.0, 1.0, [])


# -- the two found by rendering --------------------------------------------------------------

def test_qwen_image_edit_example_passes_ctrl_img_only(tmp_path, example_aras):
    picture = image(tmp_path / "control" / "image.jpg")
    raw = yaml.safe_load((EXAMPLES / "train_lora_qwen_image_edit_32gb.yaml").read_text())
    raw["config"]["process"][0]["training_folder"] = str(tmp_path / "output")
    for item in raw["config"]["process"][0]["sample"]["samples"]:
        item["ctrl_img"] = str(picture)
    [config] = write_run(raw["config"]["name"], *raw["config"]["process"])
    job, renders = render(config, tmp_path, aitk_root=example_aras)
    assert job.model == "qwen_image_edit" and len(renders) == 10
    for i, (index, spec) in enumerate(renders):
        assert index == i
        assert params(spec) == ("do the thing to it", "", 42 + i, 1024, 1024, 25, 3.0, 1.0, ["ctrl_img"])


def test_flux2_sizes_floor_to_16(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), arch="flux2",
                                        name_or_path="black-forest-labs/FLUX.2-dev", prompts=["a --w 120 --h 72"]))
    _, [(_, spec)] = render(config, tmp_path)
    assert (spec.width, spec.height) == (120, 72)  # GenerateImageConfig floors to 8 only
    divisor = MODELS["flux2"].divisor
    assert (snap(spec.width, divisor), snap(spec.height, divisor)) == (112, 64)  # flux2_model.py:88


# -- the four further bullets ----------------------------------------------------------------

def test_qwen_image_arch_on_edit_weights_renders_t2i_on_those_weights(tmp_path, hf_cache):
    hf_cache("Qwen/Qwen-Image-Edit-2511")
    [config] = write_run("job", process("job", training_folder=str(tmp_path), arch="qwen_image",
                                        name_or_path="Qwen/Qwen-Image-Edit-2511", prompts=["a"]))
    job, [(_, spec)] = render(config, tmp_path)
    assert (spec.model, spec.base) == ("qwen_image", "Qwen/Qwen-Image-Edit-2511")
    assert params(spec) == ("a", "", 42, 1024, 1024, 25, 4.0, 1.0, [])
    assert not any("base model" in gap for gap in parity_gaps(job))
    assert any("text-to-image pipeline" in w for w in job.warnings)


def test_run_base_not_on_this_machine_is_a_recorded_substitution(tmp_path, hf_cache):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), arch="qwen_image",
                                        name_or_path="someone/qwen-image-distilled", prompts=["a"]))
    job, [(_, spec)] = render(config, tmp_path)
    assert spec.base is None
    assert parity_gaps(job)[0].startswith("the run's base model 'someone/qwen-image-distilled' is not on this "
                                          "machine") and "models.qwen_image.path" in parity_gaps(job)[0]


@pytest.mark.parametrize("kind", ["folder", "relative to aitk_root", "hub cache", "stock"])
def test_run_renders_on_its_own_base(tmp_path, hf_cache, kind):
    folder = tmp_path / "ai-toolkit" / "models" / "klein"
    folder.mkdir(parents=True)
    name_or_path, expected, read = {
        "folder": (str(folder), str(folder), {}),
        "relative to aitk_root": ("models/klein", str(folder), {"aitk_root": tmp_path / "ai-toolkit"}),
        "hub cache": ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-4B", {}),
        "stock": ("black-forest-labs/FLUX.2-dev", None, {}),
    }[kind]
    hf_cache("black-forest-labs/FLUX.2-klein-4B")
    [config] = write_run("job", process("job", training_folder=str(tmp_path / "out"), arch="flux2",
                                        name_or_path=name_or_path, prompts=["a"]))
    job, [(_, spec)] = render(config, tmp_path, **read)
    assert (spec.model, spec.base) == ("flux2", expected)
    assert not any("base model" in gap for gap in parity_gaps(job))


def test_json_syntax_config_is_a_training_run(tmp_path):
    [config] = write_run("job", process("job", training_folder=str(tmp_path), prompts=["a --seed 3"]))
    config.write_text(json.dumps(yaml.safe_load(config.read_text()), indent="\t"))  # tabs: not valid YAML
    assert is_job_config(config)
    _, [(_, spec)] = render(config, tmp_path)
    assert params(spec) == ("a", "", 3, 1024, 1024, 25, 4.0, 1.0, [])
    request = tmp_path / "request" / "config.yaml"
    request.parent.mkdir()
    request.write_text(json.dumps({"model": "qwen_image", "prompts": [{"prompt": "x"}]}))
    assert not is_job_config(request)
    for broken in ("{not: [json", "\x00\x01", ""):
        request.write_text(broken)
        assert not is_job_config(request)
    assert not is_job_config(tmp_path / "absent.yaml") and not is_job_config(tmp_path)


def test_relative_ctrl_img_run_folder_first_then_aitk_root(tmp_path):
    root = tmp_path / "ai-toolkit"
    in_root = image(root / "refs" / "a.png", "blue")
    [config] = write_run("job", process(
        "job", training_folder=str(tmp_path / "out"), arch="qwen_image_edit", name_or_path="Qwen/Qwen-Image-Edit",
        samples=[{"prompt": "edit", "ctrl_img": "refs/a.png"}]))
    with pytest.raises(IntakeError) as err:
        read_job(config, aitk_root=None)
    assert err.value.problems[0].startswith(
        f"config.process[0].sample.samples[0].ctrl_img: file not found: {config.parent / 'refs' / 'a.png'}")
    with pytest.raises(IntakeError) as err:
        read_job(config, aitk_root=tmp_path / "elsewhere")
    assert (f"file not found: tried {config.parent / 'refs' / 'a.png'}, {tmp_path / 'elsewhere' / 'refs' / 'a.png'}"
            in err.value.problems[0])

    job, [(_, spec)] = render(config, tmp_path, aitk_root=root)
    assert job.samples[0].control == (("ctrl_img", str(in_root)),)
    assert params(spec) == ("edit", "", 42, 1024, 1024, 25, 4.0, 1.0, ["ctrl_img"])
    in_run = image(config.parent / "refs" / "a.png", "green")  # the run folder wins
    assert read_job(config, aitk_root=root).samples[0].control == (("ctrl_img", str(in_run)),)


def test_ui_uploaded_control_image_outside_allowed_roots_names_the_data_folder(tmp_path):
    uploaded = image(tmp_path / "aitk-data" / "images" / "up.png")
    [config] = write_run("job", process(
        "job", training_folder=str(tmp_path / "inbox"), arch="qwen_image_edit", name_or_path="Qwen/Qwen-Image-Edit",
        samples=[{"prompt": "edit", "ctrl_img": str(uploaded)}]))
    job = read_job(config)
    store = ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path / "inbox"])
    with pytest.raises(IntakeError) as err:
        specs_for_checkpoint(job, None, parity="aitk", resolve_image=store.resolve)
    [problem] = err.value.problems
    assert "outside the allowed roots" in problem and "<dataRoot>/images/" in problem


# -- the three example configs ----------------------------------------------------------------

@pytest.mark.parametrize("name,model,prompts,slots", [
    ("train_lora_qwen_image_24gb.yaml", "qwen_image", 10, []),
    ("train_lora_qwen_image_edit_32gb.yaml", "qwen_image_edit", 10, ["ctrl_img"]),
    ("train_lora_qwen_image_edit_2509_32gb.yaml", "qwen_image_edit_plus", 5, ["ctrl_img_1", "ctrl_img_2"]),
])
def test_example_configs_sample_exactly_as_ai_toolkit(tmp_path, example_aras, name, model, prompts, slots):
    text = (EXAMPLES / name).read_text()
    for path in ("/path/to/image1.png", "/path/to/image2.png", "/path/to/control/image.jpg"):
        text = text.replace(path, str(image(tmp_path / path.lstrip("/"))))
    raw = yaml.safe_load(text)
    raw["config"]["process"][0]["training_folder"] = str(tmp_path / "output")
    [config] = write_run(raw["config"]["name"], *raw["config"]["process"])
    job, renders = render(config, tmp_path, aitk_root=example_aras)
    assert (job.model, job.base, len(renders)) == (model, None, prompts)
    source = raw["config"]["process"][0]["sample"]
    texts = source.get("prompts") or [s["prompt"] for s in source["samples"]]
    for i, (index, spec) in enumerate(renders):
        assert index == i
        assert params(spec) == (texts[i], "", 42 + i, 1024, 1024, 25, 3.0, 1.0, slots)
        assert spec.aitk.vae_tiling and not spec.aitk.lora_merged  # low_vram; quantised: LoRA unmerged
        # uint3 with its accuracy recovery adapter, text encoder qfloat8 (ai-toolkit's example settings)
        assert (spec.aitk.quantize, spec.aitk.qtype, spec.aitk.quantize_te, spec.aitk.qtype_te) == \
            (True, "uint3", True, "qfloat8") and spec.aitk.ara.endswith("_torchao_uint3.safetensors")
