import base64
import io
import json

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.numpy import save_file

from previewd.errors import IntakeError
from previewd.intake.images import ControlImageStore
from previewd.intake.request import read_request


@pytest.fixture
def inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    save_file({"w": np.zeros((2, 2), np.float16)}, str(inbox / "ck.safetensors"))
    return inbox


@pytest.fixture
def store(tmp_path, inbox):
    return ControlImageStore(tmp_path / "store", allowed_roots=[inbox])


def drop(inbox, body, name="req.yaml"):
    path = inbox / name
    path.write_text(json.dumps(body) if name.endswith(".json") else yaml.safe_dump(body))
    return path


def read(inbox, store, body, name="req.yaml", **kw):
    return read_request(drop(inbox, body, name), allowed_roots=[inbox], resolve_image=store.resolve, **kw)


def problems(inbox, store, body, **kw):
    with pytest.raises(IntakeError) as err:
        read(inbox, store, body, **kw)
    assert err.value.kind == "request"
    return err.value.problems


SEED_EXAMPLE = {  # the seeds' minimal request, LoRA path made local
    "model": "qwen_image_2512", "trigger_word": "sks",
    "prompts": [{"prompt": "[trigger] a photo of a person", "width": 1024, "height": 1024, "seed": 42,
                 "sample_steps": 25, "guidance_scale": 4.0, "neg": ""}],
    "loras": [{"path": "ck.safetensors", "network_multiplier": 1.0}],
}


def test_seed_example_json(inbox, store):
    plan = read(inbox, store, SEED_EXAMPLE, name="job-7.json")
    assert plan.name == "job-7" and plan.parity == "aitk" and plan.output_format is None
    (i, spec), = plan.renders
    assert i == 0 and spec.prompt == "sks a photo of a person" and spec.model == "qwen_image_2512"
    assert spec.lora.path == str(inbox / "ck.safetensors") and spec.lora.network_multiplier == 1.0


def test_defaults_and_seed_per_profile(inbox, store):
    body = {"model": "flux2", "prompts": [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c", "seed": 5}]}
    aitk = read(inbox, store, body)
    spec = aitk.renders[0][1]
    assert (spec.width, spec.height, spec.sample_steps, spec.guidance_scale, spec.neg, spec.lora) == \
        (1024, 1024, 25, 4.0, "", None)  # no LoRA: base model render
    assert [s.seed for _, s in aitk.renders] == [42, 42, 5]
    ref = read(inbox, store, {**body, "parity": "reference"})
    assert ref.parity == "reference" and [s.seed for _, s in ref.renders] == [42, 43, 5]
    walk = read(inbox, store, {**body, "aitk": {"walk_seed": False}, "prompts": [
        {"prompt": "a", "seed": 7}, {"prompt": "b"}]})
    assert [s.seed for _, s in walk.renders] == [7, 7]  # ai-toolkit carry-over
    assert read(inbox, store, body, default_parity="reference").parity == "reference"


def test_trigger_per_prompt_and_no_flag_parsing_by_default(inbox, store):
    plan = read(inbox, store, {"model": "flux2", "trigger_word": "sks", "prompts": [
        {"prompt": " [trigger] x --w 512 ", "trigger_word": "zz"}, {"prompt": "[trigger] [name]"}]})
    assert plan.renders[0][1].prompt == " zz x --w 512 " and plan.renders[0][1].width == 1024
    assert plan.renders[1][1].prompt == "sks [name]"


def test_flag_parsing_opt_in(inbox, store):
    plan = read(inbox, store, {"model": "qwen_image", "aitk": {"parse_prompt_flags": True, "do_cfg_norm": True},
                               "loras": [{"path": "ck.safetensors", "network_multiplier": 0.5}],
                               "prompts": [{"prompt": " x --w 1030 --seed 3 --m 0.25 --n bad ", "seed": 9},
                                           {"prompt": "y"}]})
    a, b = (s for _, s in plan.renders)
    assert (a.prompt, a.width, a.seed, a.neg, a.lora.network_multiplier) == ("x", 1024, 3, "bad", 0.25)
    assert b.lora.network_multiplier == 0.5 and a.aitk.do_cfg_norm


def test_schema_errors_name_every_field(inbox, store):
    got = problems(inbox, store, {"model": "qwen_image_2512", "prompts": [
        {"prompt": "a"}, {"prompt": "b", "width": 12, "sample_step": 3, "seed": -2}],
        "loras": [{"path": "ck.safetensors", "network_multiplier": 5, "transformer": "low"}],
        "output": {"format": "gif"}, "extra": 1})
    assert "prompts.1.width: Input should be greater than or equal to 64 (got 12)" in got
    assert "prompts.1.sample_step: unknown field (extra_forbidden); did you mean 'sample_steps'?" in got
    assert "prompts.1.seed: Input should be greater than or equal to -1 (got -2)" in got
    assert "loras.0.network_multiplier: Input should be less than or equal to 4 (got 5)" in got
    assert any(p.startswith("loras.0.transformer: Value error, MoE") for p in got)
    assert any(p.startswith("output.format: Input should be 'png' or 'jpg' (got 'gif')") for p in got)
    assert "extra: unknown field (extra_forbidden)" in got


def test_model_and_lora_count(inbox, store):
    got = problems(inbox, store, {"model": "sdxl", "prompts": [],
                                  "loras": [{"path": "ck.safetensors"}] * 65})
    assert got[0].startswith("model: unknown model id (known: qwen_image, ")
    assert any(p.startswith("prompts: List should have at least 1 item") for p in got)
    assert "loras: at most 64 LoRAs per request (each is a row of the grid, not stacked)" in got


def _checkpoints(inbox, *names):
    for name in names:
        save_file({"w": np.zeros((2, 2), np.float16)}, str(inbox / name))
    return [{"path": name} for name in names]


def test_a_sweep_renders_every_lora_strength_prompt_and_seed_once(inbox, store):
    loras = _checkpoints(inbox, "a_000000250.safetensors", "a_000000500.safetensors")
    loras[1]["network_multipliers"] = [0.5, 1.5]
    plan = read(inbox, store, {"model": "qwen_image_2512", "network_multipliers": [0.75, 1.0], "seeds": [1, 2, 3],
                               "prompts": [{"prompt": "x"}, {"prompt": "y", "seed": 9},
                                           {"prompt": "z", "seeds": [7, 8]}],
                               "loras": loras})
    got = [(i, s.lora.path.rsplit("/", 1)[1], s.lora.network_multiplier, s.seed) for i, s in plan.renders]
    # LoRA, then strength (the costly switches), then prompt, then seed.
    assert got[:6] == [(0, "a_000000250.safetensors", 0.75, 1), (0, "a_000000250.safetensors", 0.75, 2),
                       (0, "a_000000250.safetensors", 0.75, 3), (1, "a_000000250.safetensors", 0.75, 9),
                       (2, "a_000000250.safetensors", 0.75, 7), (2, "a_000000250.safetensors", 0.75, 8)]
    assert len(got) == 2 * 2 * (3 + 1 + 2) == len(set(got))
    assert {m for _i, name, m, _s in got if name == "a_000000500.safetensors"} == {0.5, 1.5}
    assert plan.swept == {"strength", "seed"}


def test_a_prompts_own_multiplier_collapses_the_strengths_it_overrides(inbox, store):
    plan = read(inbox, store, {"model": "qwen_image_2512", "prompts": [{"prompt": "x"},
                                                                       {"prompt": "y", "network_multiplier": 0.8}],
                               "loras": [{"path": "ck.safetensors", "network_multipliers": [0.5, 1.0, 1.5]}]})
    assert [(i, s.lora.network_multiplier) for i, s in plan.renders] == [(0, 0.5), (1, 0.8), (0, 1.0), (0, 1.5)]


def test_a_request_without_sweep_fields_reads_as_before(inbox, store):
    plan = read(inbox, store, SEED_EXAMPLE)
    assert plan.swept == frozenset() and len(plan.renders) == 1


def test_sweep_fields_are_checked(inbox, store):
    (inbox / "other").mkdir()
    save_file({"w": np.zeros((2, 2), np.float16)}, str(inbox / "other" / "ck.safetensors"))
    got = problems(inbox, store, {"model": "qwen_image_2512", "seeds": [1, 1],
                                  "prompts": [{"prompt": "x", "seed": 1, "seeds": [2]}, {"prompt": "y", "seeds": [-1]},
                                              {"prompt": "z", "seed": [1, 2]}],
                                  "loras": [{"path": "ck.safetensors", "network_multipliers": [0.5, 9]},
                                            {"path": "ck.safetensors", "network_multiplier": [1, 2]},
                                            {"path": "ck.safetensors", "network_multiplier": 1,
                                             "network_multipliers": [1]}]})
    assert "seeds: Value error, lists a value twice" in got
    assert any(p.startswith("prompts.0: Value error, give `seed` or `seeds`, not both") for p in got)
    assert "prompts.1.seeds.0: Input should be greater than or equal to 0 (got -1)" in got
    assert any(p.startswith("prompts.2.seed: one value; to sweep several, name the list seeds") for p in got)
    assert "loras.0.network_multipliers.1: Input should be less than or equal to 4 (got 9)" in got
    assert any(p.startswith("loras.1.network_multiplier: one value; to sweep several, name the list "
                            "network_multipliers") for p in got)
    assert any(p.startswith("loras.2: Value error, give `network_multiplier` or `network_multipliers`") for p in got)
    same = problems(inbox, store, {"model": "qwen_image_2512", "prompts": [{"prompt": "x"}],
                                   "loras": [{"path": "ck.safetensors"}, {"path": "other/ck.safetensors"}]})
    assert same == ["loras.1.path: the same file name as loras.0 (ck.safetensors); each LoRA is a row named after "
                    "its file, so give them distinct names"]
    huge = problems(inbox, store, {"model": "qwen_image_2512", "prompts": [{"prompt": "x", "seeds": list(range(1000))}],
                                   "network_multipliers": [0.5, 1, 1.5], "loras": [{"path": "ck.safetensors"}]})
    assert huge == ["(sweep): 3000 renders; at most 2048 per request"]


def test_yaml_syntax_and_top_level(inbox, store):
    path = inbox / "bad.yaml"
    path.write_text("model: [x\n")
    with pytest.raises(IntakeError, match="syntax"):
        read_request(path, allowed_roots=[inbox], resolve_image=store.resolve)
    path.write_text("- 1\n")
    with pytest.raises(IntakeError, match="expected a mapping"):
        read_request(path, allowed_roots=[inbox], resolve_image=store.resolve)


@pytest.mark.parametrize("lora_path,message", [
    ("missing.safetensors", "file not found"),
    ("model.ckpt", "pickled checkpoint"),
    ("weights.bin", "pickled checkpoint"),
    ("notes.txt", "not a .safetensors file"),
    ("../elsewhere/ck.safetensors", "outside the allowed roots"),
    ("https://example.com/x.safetensors", "URLs are not downloaded"),
])
def test_lora_path_checks(inbox, store, tmp_path, lora_path, message):
    (tmp_path / "elsewhere").mkdir()
    save_file({"w": np.zeros(1, np.float16)}, str(tmp_path / "elsewhere" / "ck.safetensors"))
    (inbox / "model.ckpt").write_bytes(b"\x80\x04")
    got = problems(inbox, store, {"model": "flux2", "prompts": [{"prompt": "a"}], "loras": [{"path": lora_path}]})
    assert len(got) == 1 and got[0].startswith("loras.0.path: ") and message in got[0]


def test_output_dir_confined(inbox, store, tmp_path):
    plan = read(inbox, store, {"model": "flux2", "prompts": [{"prompt": "a"}], "output": {"dir": "out", "format": "jpg"}})
    assert plan.output_dir == inbox / "out" and plan.output_format == "jpg"
    got = problems(inbox, store, {"model": "flux2", "prompts": [{"prompt": "a"}], "output": {"dir": str(tmp_path)}})
    assert got[0].startswith("output.dir: ") and "allowed_roots" in got[0]


def png_b64():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "green").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_control_images_and_model_rules(inbox, store):
    Image.new("RGB", (8, 8)).save(inbox / "c.png")
    plan = read(inbox, store, {"model": "qwen_image_edit_plus", "prompts": [
        {"prompt": "a", "ctrl_img_1": "c.png", "ctrl_img_2": f"data:image/png;base64,{png_b64()}"}]})
    spec = plan.renders[0][1]
    assert [c.slot for c in spec.control_images] == ["ctrl_img_1", "ctrl_img_2"]
    assert all(c.sha256 for c in spec.control_images)

    got = problems(inbox, store, {"model": "qwen_image_edit", "prompts": [
        {"prompt": "a"}, {"prompt": "b", "ctrl_img": "nope.png"}, {"prompt": "c", "ctrl_img": "/etc/hostname"}]})
    assert got[0] == "prompts.0.ctrl_img: qwen_image_edit requires a control image in `ctrl_img`"
    assert got[1].startswith("prompts.1.ctrl_img: file not found: ")
    assert got[2].startswith("prompts.2.ctrl_img: /etc/hostname is outside the allowed roots")
    got = problems(inbox, store, {"model": "qwen_image_2512", "prompts": [{"prompt": "a", "ctrl_img": "c.png"}]})
    assert got == ["prompts.0.ctrl_img: qwen_image_2512 takes no control image (got ctrl_img)"]


def test_the_aitk_block_selects_the_quantisation_as_a_run_config_does(inbox, store, tmp_path, example_aras):
    def options(model="qwen_image_2512", **aitk):
        (_, spec), = read(inbox, store, {**SEED_EXAMPLE, "model": model, "aitk": aitk}).renders
        return spec.aitk

    plain = options()
    assert (plain.quantize, plain.quantize_te) == (False, None)  # the configured text encoder applies
    assert (options(quantize=True).quantize_te, options(quantize=True).qtype_te) == (True, "qfloat8")
    assert options(quantize=True, quantize_te=False).quantize_te is False
    (inbox / "ara.safetensors").write_bytes(b"x")
    local = options(quantize=True, qtype="uint3|ara.safetensors")
    assert (local.qtype, local.ara) == ("uint3", str(inbox / "ara.safetensors"))
    hub = "ostris/accuracy_recovery_adapters/qwen_image_torchao_uint3.safetensors"
    assert options(quantize=True, qtype=f"uint4|{hub}").ara == hub
    plan = read(inbox, store, {**SEED_EXAMPLE, "model": "flux2",
                               "aitk": {"quantize": True, "qtype": "uint4", "qtype_te": "qfloat8"}})
    assert plan.renders[0][1].aitk.qtype_te == "uint4" and "FLUX.2 quantises its text encoder" in plan.warnings[0]


def test_a_quantisation_previewd_cannot_reproduce_or_an_adapter_it_cannot_find_is_refused(inbox, store, tmp_path,
                                                                                           example_aras):
    def refused(**aitk):
        return problems(inbox, store, {**SEED_EXAMPLE, "aitk": aitk})

    assert refused(quantize=True, qtype="qint4") == [
        "aitk.qtype: 'qint4' is not a quantisation previewd reproduces "
        "(qfloat8, uint2, uint3, uint4, uint5, uint6, uint7, uint8)"]
    assert refused(quantize_te=True, qtype_te="float8")[0].startswith("aitk.qtype_te: 'float8' is not")
    [missing] = refused(quantize=True, qtype="uint3|ostris/accuracy_recovery_adapters/other.safetensors")
    assert missing.endswith("fetch it with `hf download ostris/accuracy_recovery_adapters other.safetensors`")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    [outside] = refused(quantize=True, qtype=f"uint3|{tmp_path / 'outside.safetensors'}")
    assert "outside the allowed roots" in outside
