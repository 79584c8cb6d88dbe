"""The four Qwen adapters on tiny random models (previewd.pipelines.tiny.qwen), both profiles.

The edit models condition on ~1 MP images, which dominates CPU time at test sizes; these tests
shrink those areas to 128^2 (tiny-models-cpu.md §5). The golden tests run them unpatched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from previewd.errors import LoraError, PipelineError, RenderInterrupted
from previewd.pipelines import create
from previewd.pipelines.qwen import encode as qwen_encode
from previewd.spec import AitkOptions, ControlImage, LoraSpec, ModelSource, RenderSpec

from qwen_helpers import pixels

pytestmark = pytest.mark.slow

IDS = ("qwen_image_2512", "qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_plus_2511")
PROFILES = ("aitk", "reference")
SMALL_AREA = 128 * 128


@pytest.fixture(scope="module", autouse=True)
def small_conditioning():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwen_encode, "EDIT_TE_AREA", SMALL_AREA)
        mp.setattr(plus, "CONDITION_IMAGE_SIZE", SMALL_AREA)
        mp.setattr(plus, "VAE_IMAGE_SIZE", SMALL_AREA)
        mp.setattr(edit, "calculate_dimensions", lambda area, ratio: original(min(area, SMALL_AREA), ratio))
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    rng = np.random.default_rng(3)
    for name, (w, h) in {"sq": (64, 64), "land": (96, 64), "port": (64, 96)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def adapters(tiny_model):
    torch.set_num_threads(2)
    made = {}

    def get(model_id):
        if model_id not in made:
            made[model_id] = create(model_id, ModelSource(path=str(tiny_model(model_id))), device="cpu",
                                    dtype="float32")
        return made[model_id]

    yield get
    for adapter in made.values():
        adapter.unload()


def _lora_file(adapter, path, seed, rank=4, scale=0.6, fmt="aitk"):
    """A random LoRA over every transformer-block Linear, written the way the format's trainer does."""
    adapter.load()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in sorted(adapter.lora.module_names):
        if not name.startswith("transformer_blocks."):
            continue
        module = adapter.pipe.transformer.get_submodule(name)
        base = getattr(module, "base_layer", module)
        a = torch.randn(rank, base.in_features, generator=g) * scale
        b = torch.randn(base.out_features, rank, generator=g) * scale
        if fmt == "aitk":
            sd[f"diffusion_model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            sd[f"diffusion_model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        else:  # kohya, with alpha = rank / 2 compensated by doubling B
            sd[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = a.to(torch.bfloat16)
            sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = (b.to(torch.bfloat16).float() * 2)
            sd[f"lora_unet_{name.replace('.', '_')}.alpha"] = torch.tensor(rank / 2)
    save_file(sd, str(path))
    return str(path)


def _controls(model_id, workdir, names=("sq",)):
    if model_id == "qwen_image_2512":
        return ()
    if model_id == "qwen_image_edit":
        return (ControlImage(slot="ctrl_img", path=str(workdir / f"{names[0]}.png")),)
    return tuple(ControlImage(slot=f"ctrl_img_{i + 1}", path=str(workdir / f"{n}.png")) for i, n in enumerate(names))


def _spec(model_id, workdir, parity="aitk", names=("sq",), **kw):
    kw.setdefault("sample_steps", 2)
    return RenderSpec(model=model_id, parity=parity, prompt=kw.pop("prompt", "a red fox in snow"),
                      neg=kw.pop("neg", "blurry"), width=kw.pop("width", 64), height=kw.pop("height", 64),
                      control_images=kw.pop("control_images", _controls(model_id, workdir, names)), **kw)


@pytest.mark.parametrize("parity", PROFILES)
@pytest.mark.parametrize("model_id", IDS)
def test_same_seed_same_bytes_snapping_and_record(adapters, workdir, model_id, parity):
    adapter = adapters(model_id)
    spec = _spec(model_id, workdir, parity, width=100, height=72)
    first, second = adapter.render(spec), adapter.render(spec)
    assert first.image.tobytes() == second.image.tobytes()
    assert first.image.size == (96, 64) and (first.width, first.height) == (96, 64)
    assert first.seed == 42
    record = first.record
    assert record["size"] == [96, 64] and record["requested_size"] == [100, 72]
    assert record["parity"] == parity and record["true_cfg_scale"] == 4.0 and record["lora"] is None
    assert record["scheduler"]["source"] == ("aitk-hardcoded" if parity == "aitk" else "model-folder")
    other_seed = adapter.render(_spec(model_id, workdir, parity, width=100, height=72, seed=7))
    assert other_seed.image.tobytes() != first.image.tobytes()


@pytest.mark.parametrize("model_id", IDS)
def test_random_seed_is_returned_and_reproducible(adapters, workdir, model_id):
    adapter = adapters(model_id)
    drawn = adapter.render(_spec(model_id, workdir, seed=-1))
    assert drawn.seed >= 0 and drawn.record["seed"] == drawn.seed
    again = adapter.render(_spec(model_id, workdir, seed=drawn.seed))
    assert again.image.tobytes() == drawn.image.tobytes()


@pytest.mark.parametrize("parity", PROFILES)
@pytest.mark.parametrize("model_id", IDS)
def test_lora_changes_pixels_and_multiplier_zero_is_base(adapters, workdir, tmp_path, model_id, parity):
    adapter = adapters(model_id)
    lora = _lora_file(adapter, tmp_path / "l.safetensors", seed=1)
    base = pixels(adapter.render(_spec(model_id, workdir, parity)).image)
    with_lora = adapter.render(_spec(model_id, workdir, parity, lora=LoraSpec(path=lora)))
    assert np.abs(pixels(with_lora.image) - base).max() > 10
    # aitk merges like ai-toolkit (non-quantised runs); reference follows the seeds per model.
    seeds_fuse = model_id in ("qwen_image_2512", "qwen_image_edit_plus_2511")
    assert with_lora.record["lora"]["mode"] == ("fuse" if parity == "aitk" or seeds_fuse else "adapter")
    zero = adapter.render(_spec(model_id, workdir, parity, lora=LoraSpec(path=lora, network_multiplier=0.0)))
    assert np.abs(pixels(zero.image) - base).max() <= 1
    none_again = adapter.render(_spec(model_id, workdir, parity))
    assert np.abs(pixels(none_again.image) - base).max() <= 1


@pytest.mark.parametrize("model_id", IDS)
def test_switching_checkpoints_and_scales_equals_fresh_loads_without_reloading(adapters, workdir, tmp_path,
                                                                              model_id):
    adapter = adapters(model_id)
    one = _lora_file(adapter, tmp_path / "a_000000250.safetensors", seed=1)
    two = _lora_file(adapter, tmp_path / "a_000000500.safetensors", seed=2)
    adapter.render(_spec(model_id, workdir))  # no LoRA loaded: fresh state for the references
    fresh_two = pixels(adapter.render(_spec(model_id, workdir, lora=LoraSpec(path=two))).image)
    adapter.lora.apply(None)
    half = LoraSpec(path=one, network_multiplier=0.5)
    fresh_one_half = pixels(adapter.render(_spec(model_id, workdir, lora=half)).image)
    adapter.lora.apply(None)

    pipe, transformer = adapter.pipe, adapter.pipe.transformer
    adapter.render(_spec(model_id, workdir, lora=LoraSpec(path=one)))
    switched = adapter.render(_spec(model_id, workdir, lora=LoraSpec(path=two)))
    assert switched.record["lora"]["swap"] == "hotswap"
    assert np.abs(pixels(switched.image) - fresh_two).max() <= 1
    adapter.render(_spec(model_id, workdir, lora=LoraSpec(path=one)))
    rescaled = adapter.render(_spec(model_id, workdir, lora=half))
    assert np.abs(pixels(rescaled.image) - fresh_one_half).max() <= 1
    assert adapter.pipe is pipe and adapter.pipe.transformer is transformer


def test_kohya_lora_with_alpha_renders_like_the_aitk_file(adapters, workdir, tmp_path):
    adapter = adapters("qwen_image_2512")
    aitk = _lora_file(adapter, tmp_path / "aitk.safetensors", seed=5)
    kohya = _lora_file(adapter, tmp_path / "kohya.safetensors", seed=5, fmt="kohya")
    a = adapter.render(_spec("qwen_image_2512", workdir, lora=LoraSpec(path=aitk)))
    k = adapter.render(_spec("qwen_image_2512", workdir, lora=LoraSpec(path=kohya)))
    assert k.record["lora"]["format"] == "kohya" and k.record["lora"]["alpha_folded"]
    assert np.abs(pixels(a.image) - pixels(k.image)).max() <= 1


def test_lora_for_another_model_is_refused(adapters, workdir, tmp_path):
    adapter = adapters("qwen_image_2512")
    path = tmp_path / "flux.safetensors"
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 16),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(48, 4)}, str(path))
    with pytest.raises(LoraError, match="none of the 1 LoRA modules"):
        adapter.render(_spec("qwen_image_2512", workdir, lora=LoraSpec(path=str(path))))


def test_prompt_embeddings_are_cached_across_checkpoints(adapters, workdir, tmp_path):
    adapter = adapters("qwen_image_edit_plus")
    lora = _lora_file(adapter, tmp_path / "c.safetensors", seed=3)
    calls = []
    hook = adapter.pipe.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        spec = _spec("qwen_image_edit_plus", workdir, names=("sq", "land"), prompt="a cached prompt")
        adapter.render(spec)
        assert len(calls) == 2  # prompt and negative
        adapter.render(spec.model_copy(update={"lora": LoraSpec(path=lora)}))
        adapter.render(spec.model_copy(update={"seed": 5}))
        assert len(calls) == 2
        adapter.render(spec.model_copy(update={"parity": "reference"}))  # swapped TE size: new embeddings
        assert len(calls) == 4
    finally:
        hook.remove()


@pytest.mark.parametrize("model_id", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_control_latents_are_encoded_once_and_reused_exactly(adapters, workdir, tmp_path, model_id):
    adapter = adapters(model_id)
    adapter.load()
    adapter.pipe.clear_latent_cache()
    calls = []
    hook = adapter.pipe.vae.encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        spec = _spec(model_id, workdir, names=("port",), seed=11)
        first = adapter.render(spec)
        encodes = len(calls)
        assert encodes >= 1
        lora = _lora_file(adapter, tmp_path / "v.safetensors", seed=4)
        adapter.render(spec.model_copy(update={"lora": LoraSpec(path=lora)}))
        adapter.lora.apply(None)
        again = adapter.render(spec)
        assert len(calls) == encodes
        assert again.image.tobytes() == first.image.tobytes()
    finally:
        hook.remove()


@pytest.mark.parametrize("parity", PROFILES)
def test_edit_output_follows_the_control_image(adapters, workdir, parity):
    adapter = adapters("qwen_image_edit")
    sq = pixels(adapter.render(_spec("qwen_image_edit", workdir, parity, names=("sq",))).image)
    land = pixels(adapter.render(_spec("qwen_image_edit", workdir, parity, names=("land",))).image)
    assert np.abs(sq - land).max() > 10


@pytest.mark.parametrize("parity", PROFILES)
@pytest.mark.parametrize("model_id", ["qwen_image_edit_plus", "qwen_image_edit_plus_2511"])
def test_edit_plus_output_follows_the_control_images_and_their_order(adapters, workdir, model_id, parity):
    adapter = adapters(model_id)
    one = pixels(adapter.render(_spec(model_id, workdir, parity, names=("sq",))).image)
    ab = pixels(adapter.render(_spec(model_id, workdir, parity, names=("sq", "land"))).image)
    ba = pixels(adapter.render(_spec(model_id, workdir, parity, names=("land", "sq"))).image)
    assert np.abs(one - ab).max() > 10
    assert np.abs(ab - ba).max() > 10


# -- where the profiles differ (aitk-sampling.md §C.4, goldens COMPARISON D1-D5) --------------------

def test_t2i_profiles_are_identical(adapters, workdir):
    adapter = adapters("qwen_image_2512")
    aitk = adapter.render(_spec("qwen_image_2512", workdir, "aitk", width=96))
    ref = adapter.render(_spec("qwen_image_2512", workdir, "reference", width=96))
    assert aitk.image.tobytes() == ref.image.tobytes()


def test_edit_profiles_agree_on_square_controls_and_differ_on_landscape(adapters, workdir):
    adapter = adapters("qwen_image_edit")
    same = [adapter.render(_spec("qwen_image_edit", workdir, p, names=("sq",))).image.tobytes() for p in PROFILES]
    assert same[0] == same[1]
    aitk, ref = (adapter.render(_spec("qwen_image_edit", workdir, p, names=("land",))) for p in PROFILES)
    assert aitk.image.tobytes() != ref.image.tobytes()
    assert aitk.record["text_encoder_images"][0]["tensor_hw"] == ref.record["text_encoder_images"][0]["tensor_hw"][::-1]
    assert aitk.record["vae_images"][0]["resize_to_output"] == "bilinear"
    assert ref.record["vae_images"][0]["resize_to_output"] == "lanczos"


@pytest.mark.parametrize("model_id", ["qwen_image_edit_plus", "qwen_image_edit_plus_2511"])
def test_edit_plus_profiles_differ_by_cfg_renorm_only(adapters, workdir, model_id):
    adapter = adapters(model_id)
    ref = adapter.render(_spec(model_id, workdir, "reference", names=("sq", "sq")))
    aitk = adapter.render(_spec(model_id, workdir, "aitk", names=("sq", "sq")))
    normed = adapter.render(_spec(model_id, workdir, "aitk", names=("sq", "sq"), aitk=AitkOptions(do_cfg_norm=True)))
    assert np.abs(pixels(aitk.image) - pixels(ref.image)).max() > 5
    assert normed.image.tobytes() == ref.image.tobytes()
    assert (aitk.record["cfg_renorm"], normed.record["cfg_renorm"], ref.record["cfg_renorm"]) == (False, True, True)
    no_cfg = [adapter.render(_spec(model_id, workdir, p, names=("sq",), guidance_scale=1.0)).image.tobytes()
              for p in PROFILES]
    assert no_cfg[0] == no_cfg[1]


def test_edit_plus_legacy_ctrl_img_is_encoded_twice_in_aitk_only(adapters, workdir):
    adapter = adapters("qwen_image_edit_plus")
    legacy = (ControlImage(slot="ctrl_img", path=str(workdir / "sq.png")),)
    aitk = adapter.render(_spec("qwen_image_edit_plus", workdir, "aitk", control_images=legacy, guidance_scale=1.0))
    ref = adapter.render(_spec("qwen_image_edit_plus", workdir, "reference", control_images=legacy,
                               guidance_scale=1.0))
    single = adapter.render(_spec("qwen_image_edit_plus", workdir, "aitk", names=("sq",), guidance_scale=1.0))
    assert [i["slot"] for i in aitk.record["text_encoder_images"]] == ["ctrl_img", "ctrl_img_1"]
    assert [i["slot"] for i in ref.record["text_encoder_images"]] == ["ctrl_img"]
    assert ref.image.tobytes() == single.image.tobytes()
    assert np.abs(pixels(aitk.image) - pixels(single.image)).max() > 5


def test_aitk_loop_with_renorm_and_the_decode_equal_the_stock_pipeline(adapters, workdir):
    from diffusers import QwenImageEditPlusPipeline

    from previewd.pipelines.qwen.decode import decode_latents

    adapter = adapters("qwen_image_edit_plus")
    adapter.load()
    images = [Image.open(workdir / "sq.png").convert("RGB"), Image.open(workdir / "land.png").convert("RGB")]
    embeds = {}
    for name, text in (("prompt_embeds", "a fox"), ("negative_prompt_embeds", "blurry")):
        embeds[name], embeds[f"{name}_mask"] = adapter.pipe.encode_prompt(text, image=images)
    kw = dict(height=64, width=64, num_inference_steps=2, true_cfg_scale=4.0)
    ours = adapter.pipe.sample(images, **embeds, **kw, generator=torch.Generator().manual_seed(1), cfg_norm=True)
    stock = {output: QwenImageEditPlusPipeline.__call__(adapter.pipe, image=images, **embeds, **kw, output_type=output,
                                                        generator=torch.Generator().manual_seed(1)).images
             for output in ("latent", "np")}
    assert torch.equal(ours, stock["latent"])
    assert np.array_equal(decode_latents(adapter.pipe, ours, 64, 64), stock["np"])


# -- refusals, progress, interruption, non-finite output -------------------------------------------

@pytest.mark.parametrize("model_id, controls, message", [
    ("qwen_image_edit", (), "requires a control image"),
    ("qwen_image_edit", (("ctrl_img_1", "sq"),), "requires a control image"),
    ("qwen_image_edit_plus", (), "requires at least one control image"),
    ("qwen_image_edit_plus_2511", (("ctrl_img_1", "sq"), ("ctrl_img_3", "sq")), "in order"),
    ("qwen_image_2512", (("ctrl_img", "sq"),), "takes no control image"),
])
def test_missing_or_misplaced_controls_are_refused_before_loading(workdir, model_id, controls, message):
    adapter = create(model_id, ModelSource(path=str(workdir / "never-loaded")), device="cpu", dtype="float32")
    images = tuple(ControlImage(slot=s, path=str(workdir / f"{n}.png")) for s, n in controls)
    with pytest.raises(PipelineError, match=message):
        adapter.render(_spec(model_id, workdir, control_images=images))
    assert adapter.pipe is None


def test_too_small_size_is_refused_before_loading(workdir):
    adapter = create("qwen_image_2512", ModelSource(path=str(workdir / "never-loaded")), device="cpu",
                     dtype="float32")
    with pytest.raises(PipelineError, match="minimum"):
        adapter.render(_spec("qwen_image_2512", workdir, width=63))
    assert adapter.pipe is None


@pytest.mark.parametrize("model_id", ["qwen_image_2512", "flux2"])
def test_missing_lora_file_is_refused_before_loading(workdir, model_id):
    adapter = create(model_id, ModelSource(path=str(workdir / "never-loaded")), device="cpu", dtype="float32")
    spec = RenderSpec(model=model_id, prompt="a red fox", width=64, height=64, sample_steps=2,
                      lora=LoraSpec(path=str(workdir / "gone.safetensors")))
    with pytest.raises(LoraError, match="not found"):
        adapter.render(spec)
    assert getattr(adapter, "pipe", None) is None and getattr(adapter, "transformer", None) is None


def test_progress_and_stop(adapters, workdir):
    adapter = adapters("qwen_image_2512")
    steps = []
    adapter.render(_spec("qwen_image_2512", workdir, sample_steps=3), on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(RenderInterrupted):
        adapter.render(_spec("qwen_image_2512", workdir, sample_steps=3), should_stop=lambda: True)


@pytest.mark.parametrize("parity", PROFILES)
def test_one_step_schedule_is_refused_before_it_renders_black(adapters, workdir, parity):
    adapter = adapters("qwen_image_2512")
    with pytest.raises(PipelineError, match="1-step schedule ends on a NaN sigma"):
        adapter.render(_spec("qwen_image_2512", workdir, parity, sample_steps=1))
