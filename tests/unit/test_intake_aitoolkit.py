from pathlib import Path

import pytest
import yaml
from PIL import Image

from previewd.errors import ControlImageError, IntakeError
from previewd.intake.aitoolkit import (checkpoint_step, is_checkpoint, model_id, parity_gaps, read_job,
                                       specs_for_checkpoint)
from previewd.intake.images import ControlImageStore

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "aitk-examples"


def write_job(tmp_path, process_overrides=None, sample=None, name="my_lora"):
    process = {
        "type": "sd_trainer", "training_folder": "output",
        "network": {"type": "lora", "linear": 16},
        "model": {"name_or_path": "Qwen/Qwen-Image-2512", "arch": "qwen_image", "low_vram": True},
        "sample": sample if sample is not None else {"prompts": ["a [trigger] dog"], "neg": "", "seed": 42},
        "train": {"steps": 2000},
    }
    process.update(process_overrides or {})
    job_dir = tmp_path / name
    job_dir.mkdir(exist_ok=True)
    path = job_dir / "config.yaml"
    path.write_text(yaml.safe_dump({"job": "extension", "config": {"name": name, "process": [process]},
                                    "meta": {"name": "[name]"}}))
    return path


def fake_resolver(source, base_dir, field):
    class Img:
        path = f"/store/{Path(source).name}"
        sha256 = "h-" + Path(source).name
    if "missing" in source:
        raise ControlImageError(f"{field}: file not found: {source}")
    return Img()


def test_example_text_to_image_job(example_aras):
    job = read_job(EXAMPLES / "train_lora_qwen_image_24gb.yaml")
    assert job.model == "qwen_image"
    assert job.name == "my_first_qwen_image_lora_v1"
    assert len(job.samples) == 10
    assert job.samples[0].prompt.startswith("woman with red hair, playing chess")
    assert [s.seed for s in job.samples[:3]] == [42, 43, 44]  # walk_seed: true
    assert {(s.width, s.height, s.sample_steps, s.guidance_scale, s.neg) for s in job.samples} == \
        {(1024, 1024, 25, 3.0, "")}
    assert job.trigger_word is None
    assert job.aitk.vae_tiling is True and job.aitk.do_cfg_norm is False
    assert job.settings["quantize"] is True and job.settings["qtype"].startswith("uint3|")
    assert job.settings["lora_merged"] is False  # quantized runs sample with the LoRA unmerged
    # uint3 with its adapter (found in the local Hugging Face cache, kept as the hub path) and a qfloat8
    # text encoder: all reproduced, so no quantisation gap.
    assert (job.aitk.quantize, job.aitk.qtype, job.aitk.quantize_te, job.aitk.qtype_te) == (True, "uint3", True,
                                                                                            "qfloat8")
    assert job.aitk.ara == "ostris/accuracy_recovery_adapters/qwen_image_torchao_uint3.safetensors"
    assert not any("quantis" in gap for gap in parity_gaps(job))


@pytest.mark.parametrize("name,count,slots", [
    ("train_lora_qwen_image_edit_32gb.yaml", 10, ["ctrl_img"]),
    ("train_lora_qwen_image_edit_2509_32gb.yaml", 5, ["ctrl_img_1", "ctrl_img_2"]),
])
def test_example_edit_jobs_name_every_missing_control_image(example_aras, name, count, slots):
    with pytest.raises(IntakeError) as err:
        read_job(EXAMPLES / name, aitk_root=example_aras)
    problems = err.value.problems
    assert err.value.kind == "aitk-job" and err.value.path.endswith(name)
    assert len(problems) == count * len(slots)  # an inherited ctrl_img_1 is not reported twice
    assert problems[0].startswith(f"config.process[0].sample.samples[0].{slots[0]}: file not found: /path/to/")
    assert "ai-toolkit opens control images" in problems[0]


@pytest.mark.parametrize("name,model,first_prompt", [
    ("train_lora_qwen_image_edit_32gb.yaml", "qwen_image_edit", "do the thing to it"),
    ("train_lora_qwen_image_edit_2509_32gb.yaml", "qwen_image_edit_plus", "Do whatever with Image1 and Image2"),
])
def test_example_edit_jobs_with_images_present(tmp_path, example_aras, name, model, first_prompt):
    (tmp_path / "to" / "control").mkdir(parents=True)
    for rel in ("to/image1.png", "to/image2.png", "to/control/image.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    text = (EXAMPLES / name).read_text().replace("/path/to/", f"{tmp_path}/to/")
    (tmp_path / "config.yaml").write_text(text)
    job = read_job(tmp_path / "config.yaml", aitk_root=example_aras)
    assert job.model == model
    assert job.samples[0].prompt == first_prompt
    specs = specs_for_checkpoint(job, "/ck.safetensors", parity="aitk", resolve_image=fake_resolver)
    slots = [c.slot for c in specs[0][1].control_images]
    if model == "qwen_image_edit":
        assert slots == ["ctrl_img"]  # ai-toolkit's edit model reads ctrl_img only
    else:
        assert slots == ["ctrl_img_1", "ctrl_img_2"]


@pytest.mark.parametrize("arch,nop,expected", [
    ("qwen_image", "Qwen/Qwen-Image", "qwen_image"),
    ("qwen_image", "Qwen/Qwen-Image-2512", "qwen_image_2512"),
    ("qwen_image:2512", "Qwen/Qwen-Image-2512", "qwen_image_2512"),
    ("qwen_image:2512", "/models/my_base", "qwen_image_2512"),
    ("qwen_image", "/cache/models--Qwen--Qwen-Image-2512/snapshots/abc", "qwen_image_2512"),
    ("qwen_image_edit", "Qwen/Qwen-Image-Edit", "qwen_image_edit"),
    ("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2509", "qwen_image_edit_plus"),
    ("qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2511", "qwen_image_edit_plus_2511"),
    ("qwen_image_edit_plus:2511", "/local/edit", "qwen_image_edit_plus_2511"),
    ("flux2", "black-forest-labs/FLUX.2-dev", "flux2"),
])
def test_model_id_table(arch, nop, expected):
    assert model_id(arch, nop)[0] == expected


def test_model_id_tag_is_only_a_hint():
    mid, warnings = model_id("qwen_image:2512", "Qwen/Qwen-Image")
    assert mid == "qwen_image" and "using qwen_image" in warnings[0]


def test_model_id_qwen_image_arch_samples_edit_weights_as_text_to_image():
    mid, warnings = model_id("qwen_image", "Qwen/Qwen-Image-Edit-2509")
    assert mid == "qwen_image" and "text-to-image pipeline" in warnings[0]


@pytest.mark.parametrize("arch,nop,match", [
    ("wan22_14b", "x", "not supported"),
    ("qwen_image_edit", "Qwen/Qwen-Image-2512", "does not match"),
    ("flux2", "Qwen/Qwen-Image", "does not match"),
])
def test_model_id_errors(arch, nop, match):
    with pytest.raises(ValueError, match=match):
        model_id(arch, nop)


def test_samples_win_over_prompts_and_section_defaults(tmp_path):
    path = write_job(tmp_path, sample={
        "prompts": ["ignored"], "width": 768, "height": 512, "guidance_scale": 2.5, "sample_steps": 9,
        "network_multiplier": 0.8, "neg": "bad", "seed": 5,
        "samples": [{"prompt": "one"}, {"prompt": "two", "width": 1000, "neg": "worse", "network_multiplier": 1.2}],
    })
    job = read_job(path)
    assert [s.prompt for s in job.samples] == ["one", "two"]
    one, two = job.samples
    assert (one.width, one.height, one.guidance_scale, one.sample_steps, one.neg) == (768, 512, 2.5, 9, "bad")
    assert (two.width, two.neg, two.network_multiplier, one.network_multiplier) == (1000, "worse", 1.2, 0.8)
    assert one.seed == two.seed == 5  # walk_seed defaults to false
    assert job.settings["lora_merged"] is False  # multipliers differ


def test_trigger_flags_and_seed_rules(tmp_path):
    path = write_job(tmp_path, {"trigger_word": "p3r5on"}, sample={
        "seed": 10, "walk_seed": False, "neg": "",
        "samples": [
            {"prompt": "  [trigger] in [name] style --w 1030 --h 12 --cfg 6 --steps 8 --m 0.5 --n nope "},
            {"prompt": "b", "seed": 99},
            {"prompt": "c --seed 3"},
            {"prompt": "d"},
        ]})
    job = read_job(path)
    a, b, c, d = job.samples
    # [name] was already replaced by the job name when the config loaded, as ai-toolkit does
    assert a.prompt == "p3r5on in my_lora style"
    assert (a.width, a.height, a.guidance_scale, a.sample_steps, a.network_multiplier, a.neg) == \
        (1024, 64, 6.0, 8, 0.5, "nope")
    assert [a.seed, b.seed, c.seed, d.seed] == [10, 99, 3, 99]  # item seed persists, flag does not


def test_walk_seed_restarts_from_section_seed(tmp_path):
    path = write_job(tmp_path, sample={"seed": 10, "walk_seed": True, "neg": "",
                                       "samples": [{"prompt": "a"}, {"prompt": "b", "seed": 1}, {"prompt": "c"}]})
    assert [s.seed for s in read_job(path).samples] == [10, 1, 12]


def test_no_trigger_word_leaves_placeholder(tmp_path):
    job = read_job(write_job(tmp_path))
    assert job.samples[0].prompt == "a [trigger] dog"


def test_missing_neg_is_the_text_False(tmp_path):
    job = read_job(write_job(tmp_path, sample={"prompts": ["x"]}))
    assert job.samples[0].neg == "False"
    assert any('"False"' in w for w in job.warnings)
    # ai-toolkit defaults when the section is bare
    s = job.samples[0]
    assert (s.width, s.height, s.seed, s.guidance_scale, s.sample_steps) == (512, 512, 0, 7.0, 20)


def test_cfg_norm_only_for_edit_plus(tmp_path):
    img = tmp_path / "c.png"
    Image.new("RGB", (8, 8)).save(img)
    sample = {"do_cfg_norm": True, "neg": "", "samples": [{"prompt": "x", "ctrl_img_1": str(img)}]}
    plus = read_job(write_job(tmp_path, {"model": {"arch": "qwen_image_edit_plus:2511",
                                                   "name_or_path": "Qwen/Qwen-Image-Edit-2511"}}, sample))
    assert plus.model == "qwen_image_edit_plus_2511"
    assert plus.aitk.do_cfg_norm is True and plus.aitk.vae_tiling is False


def test_all_problems_in_one_error(tmp_path):
    path = write_job(tmp_path, {"network": {"type": "lokr"}, "model": {"arch": "sdxl", "name_or_path": "x"}},
                     sample={"neg": "", "samples": [{"prompt": "a --w big"}, {"prompt": "b", "width": "wide"},
                                                    {"prompt": "c", "sample_steps": 0}]})
    with pytest.raises(IntakeError) as err:
        read_job(path)
    text = "\n".join(err.value.problems)
    assert "config.process[0].network.type: 'lokr' is not supported" in text
    assert "config.process[0].model: arch 'sdxl' is not supported" in text
    assert "samples[0].prompt: --w: expected an integer, got 'big'" in text
    assert "samples[1].width: Value error, expected a number of pixels (ai-toolkit's sampler crashes on " \
           "anything else) (got 'wide')" in text


def test_spec_problems_reported_at_read_time(tmp_path):
    img = tmp_path / "c.png"
    Image.new("RGB", (8, 8)).save(img)
    path = write_job(tmp_path, sample={"neg": "", "samples": [{"prompt": "a", "sample_steps": 0},
                                                              {"prompt": "b", "ctrl_img": str(img)}]})
    with pytest.raises(IntakeError) as err:
        read_job(path)
    assert err.value.problems[0].startswith("config.process[0].sample.samples[0].sample_steps: ")
    assert err.value.problems[1].startswith("config.process[0].sample.samples[1].ctrl_img: ai-toolkit's "
                                            "qwen_image_2512 model takes no control image")


def test_edit_model_without_control_image_is_an_error(tmp_path):
    path = write_job(tmp_path, {"model": {"arch": "qwen_image_edit", "name_or_path": "Qwen/Qwen-Image-Edit"}})
    with pytest.raises(IntakeError, match="requires a control image"):
        read_job(path)


def test_specs_for_checkpoint(tmp_path):
    path = write_job(tmp_path, {"trigger_word": "sks"}, sample={
        "neg": "", "seed": 42, "walk_seed": True, "network_multiplier": 0.75,
        "samples": [{"prompt": "[trigger] a"}, {"prompt": "b --m 1.5"}]})
    job = read_job(path)
    specs = specs_for_checkpoint(job, "/snap/ck.safetensors", parity="reference", resolve_image=fake_resolver,
                                 lora_sha256="abc")
    assert [i for i, _ in specs] == [0, 1]
    first, second = specs[0][1], specs[1][1]
    assert (first.model, first.parity, first.prompt, first.seed) == ("qwen_image_2512", "reference", "sks a", 42)
    assert first.lora.path == "/snap/ck.safetensors" and first.lora.sha256 == "abc"
    assert (first.lora.network_multiplier, second.lora.network_multiplier) == (0.75, 1.5)
    assert second.seed == 43 and first.aitk.vae_tiling


def test_specs_for_checkpoint_collects_image_failures(tmp_path):
    for n in ("a.png", "missing.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / n)
    path = write_job(tmp_path, {"model": {"arch": "qwen_image_edit_plus", "name_or_path": "Qwen/Qwen-Image-Edit-2509"}},
                     sample={"neg": "", "samples": [
                         {"prompt": "x", "ctrl_img_1": str(tmp_path / "a.png"), "ctrl_img_2": str(tmp_path / "missing.png")},
                         {"prompt": "y", "ctrl_img": str(tmp_path / "missing.png")}]})
    job = read_job(path)
    with pytest.raises(IntakeError) as err:
        specs_for_checkpoint(job, "/ck.safetensors", parity="aitk", resolve_image=fake_resolver)
    assert err.value.problems == [
        f"config.process[0].sample.samples[0].ctrl_img_2: file not found: {tmp_path / 'missing.png'}",
        f"config.process[0].sample.samples[1].ctrl_img: file not found: {tmp_path / 'missing.png'}",
        f"config.process[0].sample.samples[1].ctrl_img_1: file not found: {tmp_path / 'missing.png'}",
    ]


def test_specs_with_real_store_keep_duplicated_slots(tmp_path):
    img = tmp_path / "c.png"
    Image.new("RGB", (16, 8), "red").save(img)
    path = write_job(tmp_path, {"model": {"arch": "qwen_image_edit_plus", "name_or_path": "Qwen/Qwen-Image-Edit-2509"}},
                     sample={"neg": "", "samples": [{"prompt": "x", "ctrl_img": "../c.png"}]})
    job = read_job(path)
    store = ControlImageStore(tmp_path / "store", allowed_roots=[tmp_path])
    (_, spec), = specs_for_checkpoint(job, "/ck.safetensors", parity="aitk", resolve_image=store.resolve)
    a, b = spec.control_images
    assert (a.slot, b.slot) == ("ctrl_img", "ctrl_img_1") and a.sha256 == b.sha256
    assert Path(a.path).parent == tmp_path / "store"


def test_checkpoints_and_steps(tmp_path):
    job = read_job(write_job(tmp_path))
    d = job.job_dir
    assert checkpoint_step(job, d / "my_lora_000000250.safetensors") == 250
    assert checkpoint_step(job, d / "my_lora_1000000000.safetensors") == 1000000000
    final = d / "my_lora.safetensors"
    assert is_checkpoint(job, final)
    assert checkpoint_step(job, final) is None
    assert checkpoint_step(job, final, {"training_info": '{"step": 2000, "epoch": 0}'}) == 2000
    for other in ("my_lora_LoRA.safetensors", "my_lora_250.safetensors", "optimizer.pt",
                  "other_000000250.safetensors", "my_lora_000000250.safetensors.tmp"):
        assert not is_checkpoint(job, d / other) and checkpoint_step(job, d / other) is None
    assert not is_checkpoint(job, tmp_path / "my_lora_000000250.safetensors")  # not in the job folder


def test_not_a_job_config(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text("foo: [1, 2\n")
    with pytest.raises(IntakeError, match="yaml"):
        read_job(p)
    p.write_text("model: qwen_image\n")
    with pytest.raises(IntakeError, match="not an ai-toolkit job config"):
        read_job(p)


# -- quantised runs (aitk-quantized.md §1) -------------------------------------------------------

def quantised(tmp_path, name_or_path="Qwen/Qwen-Image-2512", arch="qwen_image", **model):
    job = read_job(write_job(tmp_path, {"model": {"name_or_path": name_or_path, "arch": arch, **model}}),
                   aitk_root=tmp_path)
    return job, [gap for gap in parity_gaps(job) if "quantis" in gap or "float8" in gap]


def test_quantize_alone_also_quantises_the_text_encoder_and_nothing_is_left_to_explain(tmp_path):
    job, gaps = quantised(tmp_path, quantize=True)
    assert (job.aitk.quantize, job.aitk.qtype, job.aitk.ara, job.aitk.quantize_te, job.aitk.qtype_te) == \
        (True, "qfloat8", None, True, "qfloat8")
    assert job.aitk.lora_merged is False and gaps == []


def test_a_run_that_does_not_quantise_says_so_whatever_previewd_is_configured_with(tmp_path):
    job, gaps = quantised(tmp_path)
    assert (job.aitk.quantize, job.aitk.quantize_te) == (False, False) and gaps == []


def test_what_previewd_does_not_reproduce_stays_a_gap_that_says_exactly_what(tmp_path):
    job, gaps = quantised(tmp_path, quantize=True, qtype="qint4", quantize_te=True, qtype_te="uint4")
    assert (job.aitk.quantize, job.aitk.quantize_te, job.aitk.qtype_te) == (False, True, "uint4")
    assert gaps == ["ai-toolkit sampled a qint4-quantised transformer, which previewd does not reproduce: it "
                    "renders the transformer in full precision (with the LoRA unmerged, as ai-toolkit applied it), "
                    "so small differences are expected"]
    job, gaps = quantised(tmp_path, quantize=True, layer_offloading=True)
    assert (job.aitk.quantize, job.aitk.quantize_te) == (False, False)
    assert [gap.split(",")[0] for gap in gaps] == [
        "ai-toolkit sampled a torchao float8 (its qfloat8 under layer_offloading) transformer",
        "ai-toolkit sampled with a torchao float8 (its qfloat8 under layer_offloading) text encoder"]


def test_flux2_quantises_its_text_encoder_with_qtype(tmp_path):
    job, gaps = quantised(tmp_path, "black-forest-labs/FLUX.2-dev", "flux2", quantize=True, qtype="uint4",
                          qtype_te="qfloat8")
    assert (job.aitk.qtype, job.aitk.quantize_te, job.aitk.qtype_te) == ("uint4", True, "uint4") and gaps == []


def test_the_adapter_is_found_like_ai_toolkit_finds_it_and_a_missing_one_names_what_to_fetch(tmp_path, example_aras):
    (tmp_path / "my_lora").mkdir()
    (tmp_path / "my_lora" / "ara.safetensors").write_bytes(b"x")
    job, _ = quantised(tmp_path, quantize=True, qtype="uint3|ara.safetensors")  # the run folder first
    assert job.aitk.ara == str(tmp_path / "my_lora" / "ara.safetensors")
    (example_aras / "mine").mkdir()
    (example_aras / "mine" / "ara.safetensors").write_bytes(b"x")
    job = read_job(write_job(tmp_path, {"model": {"name_or_path": "Qwen/Qwen-Image-2512", "arch": "qwen_image",
                                                  "quantize": True, "qtype": "uint4|mine/ara.safetensors"}}),
                   aitk_root=example_aras)  # then ai-toolkit's own folder
    assert job.aitk.ara == str(example_aras / "mine" / "ara.safetensors")
    job, _ = quantised(tmp_path, quantize=True,
                       qtype="uint3|ostris/accuracy_recovery_adapters/qwen_image_torchao_uint3.safetensors")
    assert job.aitk.ara == "ostris/accuracy_recovery_adapters/qwen_image_torchao_uint3.safetensors"
    with pytest.raises(IntakeError) as err:
        quantised(tmp_path, quantize=True, qtype="uint3|ostris/accuracy_recovery_adapters/qwen_image_2512.safetensors")
    [problem] = err.value.problems
    assert problem.startswith("config.process[0].model.qtype: the accuracy recovery adapter")
    assert problem.endswith("fetch it with `hf download ostris/accuracy_recovery_adapters qwen_image_2512.safetensors`")
    with pytest.raises(IntakeError, match="is not a file on this machine"):
        quantised(tmp_path, quantize=True, qtype="uint3|not/here/at/all.safetensors")


def test_an_adapter_of_a_quantisation_previewd_does_not_reproduce_is_not_looked_for(tmp_path):
    job, gaps = quantised(tmp_path, quantize=True, qtype="qint4|nowhere.safetensors")
    assert job.aitk.ara is None and len(gaps) == 1
