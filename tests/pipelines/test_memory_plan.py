"""Memory accounting without weights: every model's real-size architecture on the meta device, the
plan's bytes against the parameter bytes, and a placement that fits each card size."""

from __future__ import annotations

import pytest
import torch

from previewd.pipelines.memory import (
    COMPONENTS,
    GiB,
    MemorySettings,
    Precision,
    choose,
    is_linear_weight,
    linear_bytes,
    measure,
    parts_from_headers,
    parts_from_module,
)
from previewd.pipelines.real_configs import build, real_config

MODELS = ("qwen_image", "qwen_image_2512", "qwen_image_edit", "qwen_image_edit_plus", "qwen_image_edit_plus_2511",
          "flux2")
BUDGETS_GB = (24, 32, 48, 80, 141)

# Parameter counts of the released models (billions): transformer, text encoder, VAE.
RELEASED = {"qwen": (20.43, 8.29, 0.127), "flux2": (32.22, 24.01, 0.084)}


def _family(model_id: str) -> str:
    return "flux2" if model_id == "flux2" else "qwen"


@pytest.fixture(scope="module")
def sizes():
    return {model_id: measure(model_id, None, "bfloat16") for model_id in MODELS}


@pytest.mark.parametrize("family", sorted(RELEASED))
def test_the_real_configs_have_the_released_parameter_counts(family):
    model_id = "flux2" if family == "flux2" else "qwen_image_2512"
    for component, billions in zip(("transformer", "text_encoder", "vae"), RELEASED[family]):
        module = build(family, component, real_config(model_id, component))
        count = sum(p.numel() for p in module.parameters()) / 1e9
        assert count == pytest.approx(billions, rel=0.005), component


@pytest.mark.parametrize("family", sorted(RELEASED))
def test_linear_weights_are_told_by_name_and_shape(family):
    model_id = "flux2" if family == "flux2" else "qwen_image_2512"
    for component in COMPONENTS:
        module = build(family, component, real_config(model_id, component))
        linears = {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        ruled = {name for name, p in module.named_parameters() if is_linear_weight(name, tuple(p.shape))}
        assert ruled == linears, component


@pytest.mark.parametrize("model_id", MODELS)
def test_planned_bytes_agree_with_the_parameter_bytes(sizes, model_id):
    """Each placement's component bytes (no LoRA) within 1 % of parameters + buffers x 2 bytes."""
    parameter_bytes = {}
    for component in COMPONENTS:
        module = build(_family(model_id), component, real_config(model_id, component), torch.bfloat16)
        parameter_bytes[component] = sum(t.numel() * t.element_size()
                                         for t in (*module.parameters(), *module.buffers()))
    for placement in ("resident", "te_offload", "model_offload", "group_offload"):
        plan = choose(model_id, sizes[model_id], device="cuda", dtype="bfloat16", lora_rank=0,
                      settings=MemorySettings(budget_bytes=1000 * GiB, placement=placement))
        assert plan.placement == placement
        for component in COMPONENTS:
            assert plan.components[component] == pytest.approx(parameter_bytes[component], rel=0.01)


SCENARIOS = {
    "bf16": dict(run=Precision(), quantize_to_fit="none"),
    "bf16, quantize_to_fit": dict(run=Precision(), quantize_to_fit="qfloat8"),
    "ai-toolkit quantised": None,  # uint3 transformer for Qwen, qfloat8 for FLUX.2; qfloat8 text encoder
}


def _run_precision(model_id: str, scenario: str) -> tuple[Precision, str]:
    if scenario == "ai-toolkit quantised":
        return Precision(transformer="qfloat8" if model_id == "flux2" else "uint3", text_encoder="qfloat8"), "none"
    return SCENARIOS[scenario]["run"], SCENARIOS[scenario]["quantize_to_fit"]


@pytest.mark.parametrize("model_id", MODELS)
def test_the_chosen_plan_fits_every_card(sizes, model_id):
    for scenario in SCENARIOS:
        run, quantize = _run_precision(model_id, scenario)
        for budget in BUDGETS_GB:
            plan = choose(model_id, sizes[model_id], device="cuda", dtype="bfloat16", run_precision=run,
                          settings=MemorySettings(budget_bytes=budget * GiB, quantize_to_fit=quantize))
            assert plan.fits and plan.peak_bytes <= budget * GiB, (scenario, budget, plan.summary())
            assert max(plan.phases.values()) + GiB == plan.peak_bytes


def test_placements_are_chosen_fastest_first(sizes):
    def placed(model_id, budget, **kwargs):
        plan = choose(model_id, sizes[model_id], device="cuda", dtype="bfloat16",
                      settings=MemorySettings(budget_bytes=budget * GiB, **kwargs))
        return plan.placement, plan.precision.transformer

    # The figures: ~59 GiB for the Qwen family and ~110 GiB for FLUX.2 in bf16.
    full = choose("qwen_image_2512", sizes["qwen_image_2512"], device="cuda", dtype="bfloat16",
                  settings=MemorySettings(budget_bytes=141 * GiB))
    assert full.placement == "resident" and 56 * GiB < full.peak_bytes < 62 * GiB
    full = choose("flux2", sizes["flux2"], device="cuda", dtype="bfloat16", settings=MemorySettings(141 * GiB))
    assert full.placement == "resident" and 104 * GiB < full.peak_bytes < 114 * GiB
    assert placed("qwen_image_2512", 80) == ("resident", "full")
    assert placed("qwen_image_2512", 48) == ("te_offload", "full")
    assert placed("qwen_image_2512", 24) == ("group_offload", "full")
    assert placed("qwen_image_2512", 24, quantize_to_fit="qfloat8") == ("model_offload", "qfloat8")
    assert placed("flux2", 80) == ("te_offload", "full")
    assert placed("flux2", 48, quantize_to_fit="qfloat8") == ("te_offload", "qfloat8")


def test_on_the_cpu_everything_stays_where_it_is(sizes):
    plan = choose("flux2", sizes["flux2"], device="cpu", dtype="float32",
                  settings=MemorySettings(budget_bytes=None, placement="group_offload"))
    assert plan.placement == "resident" and plan.fits


def test_a_quantised_plan_records_its_parity_gap(sizes):
    plan = choose("qwen_image_2512", sizes["qwen_image_2512"], device="cuda", dtype="bfloat16",
                  settings=MemorySettings(budget_bytes=24 * GiB, quantize_to_fit="qfloat8"))
    assert plan.parity_gap and "qfloat8" in plan.parity_gap
    exact = choose("qwen_image_2512", sizes["qwen_image_2512"], device="cuda", dtype="bfloat16",
                   settings=MemorySettings(budget_bytes=80 * GiB, quantize_to_fit="qfloat8"))
    assert exact.parity_gap is None


def test_qfloat8_bytes_are_what_quanto_keeps():
    from optimum.quanto import freeze, qfloat8, quantize

    layer = torch.nn.Sequential(torch.nn.Linear(128, 96, bias=False)).to(torch.bfloat16)
    quantize(layer, weights=qfloat8)
    freeze(layer)
    qweight = layer[0].qweight
    kept = qweight._data.numel() * qweight._data.element_size() + qweight._scale.numel() * qweight._scale.element_size()
    assert kept == linear_bytes(96, 128, "qfloat8", 2)


def test_uint_bytes_keep_a_code_byte_per_weight_and_a_scale_and_zero_per_group_of_64():
    assert linear_bytes(3072, 3072, "uint3", 2) == 3072 * 3072 + 3072 * 48 * (2 + 4)
    assert linear_bytes(48, 100, "uint3", 2) == 48 * 100 * 2  # inputs not a multiple of 64 stay full


@pytest.mark.slow
def test_headers_and_meta_device_count_the_same(tiny_model):
    """On disk the plan reads safetensors headers; they agree with the module built from config.json."""
    import json

    for model_id in ("qwen_image_edit_plus", "flux2"):
        folder = tiny_model(model_id)
        for component in COMPONENTS:
            config = json.loads((folder / component / "config.json").read_text())
            module = build(_family(model_id), component, config)
            from_module = parts_from_module(module, 4)
            from_headers = parts_from_headers(sorted((folder / component).glob("*.safetensors")), 4)
            linears = sorted(s for p in from_module for s in p.linears)
            assert linears == sorted(s for p in from_headers for s in p.linears), (model_id, component)
            total = sum(p.other for p in from_module) + 4 * sum(o * i for o, i in linears)
            on_disk = sum(p.other for p in from_headers) + 4 * sum(o * i for o, i in linears)
            # Files hold neither non-persistent buffers (rotary tables) nor a tied head twice.
            assert on_disk == pytest.approx(total, rel=0.01), (model_id, component)
        plan_sizes = measure(model_id, _source(folder), "float32")
        assert all("safetensors headers" in s.source for s in plan_sizes.values())


def _source(folder):
    from previewd.spec import ModelSource

    return ModelSource(path=str(folder))
