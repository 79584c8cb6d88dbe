"""Quantisation and runtime branches as ai-toolkit computes them (aitk-quantized.md §2-§3), on single
layers; the golden q-cases check the same end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from previewd.errors import ModelNotFound
from previewd.pipelines.quantization import Quantization
from previewd.pipelines.quantize import (GROUP_SIZE, UIntXLinear, ara_file, quantize_linears, quantize_transformer,
                                         uintx_quantize)
from previewd.pipelines.runtime_lora import BranchSet
from previewd.spec import AitkOptions, ModelSource, RenderSpec


def layer(inputs: int, outputs: int, dtype=torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inputs, outputs).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
def test_uintx_is_asymmetric_per_group_of_64_in_the_weight_dtype(dtype, bits):
    linear = layer(192, 8, dtype)
    with torch.no_grad():
        linear.weight[0, :64] = linear.weight[0, :64].abs()  # a group without negatives keeps zero exact too
        linear.weight[1, 5] = linear.weight[0, 7] = 0
    codes, scale, zero_point = uintx_quantize(linear.weight.detach(), bits)
    assert codes.shape == (8, 3, GROUP_SIZE) and scale.shape == zero_point.shape == (8, 3, 1)
    assert scale.dtype == dtype and int(codes.max()) <= 2 ** bits - 1
    restored = UIntXLinear(linear, bits).dequantized()
    assert restored.dtype == dtype and restored[1, 5] == 0 and restored[0, 7] == 0
    step = scale.float().expand(8, 3, GROUP_SIZE).reshape(8, 192)
    assert ((restored - linear.weight).abs().float() <= step).all()


def test_uintx_layers_run_f_linear_on_the_dequantised_weight():
    linear = layer(128, 16)
    quantized = UIntXLinear(linear, 3)
    x = torch.randn(2, 5, 128)
    assert torch.equal(quantized(x), nn.functional.linear(x, quantized.dequantized(), linear.bias))
    assert isinstance(quantized, nn.Linear) and quantized.weight is None


def test_only_layers_with_a_multiple_of_64_inputs_are_quantised_and_uint8_quantises_nothing():
    model = nn.Sequential(layer(64, 48), layer(48, 64), layer(128, 8))
    assert quantize_linears(model, "uint3") == ["0", "2"]
    assert [type(m).__name__ for m in model] == ["UIntXLinear", "Linear", "UIntXLinear"]
    assert quantize_linears(nn.Sequential(layer(64, 8)), "uint8") == []
    named = nn.Sequential(layer(64, 8), layer(64, 8))
    assert quantize_linears(named, "uint4", only={"1"}) == ["1"]
    assert type(named[0]) is nn.Linear


def test_qfloat8_is_optimum_quanto_on_every_linear():
    model = nn.Sequential(layer(48, 16), nn.LayerNorm(16), layer(16, 8))
    assert quantize_linears(model, "qfloat8") == ["0", "2"]
    assert [type(m).__name__ for m in model] == ["QLinear", "LayerNorm", "QLinear"]
    # One absmax/448 scale per output row, in the weight dtype (aitk-quantized.md §2.5).
    weight = layer(48, 16).weight.detach()
    assert torch.allclose(model[0].qweight._scale.flatten(), weight.abs().amax(dim=1) / 448)
    # Never quanto 0.2.5+'s Marlin FP8 kernel on a GPU: ai-toolkit's 0.2.4 dequantises and multiplies.
    from optimum.quanto.tensor.weights import qbytes

    assert qbytes.is_extension_available("quanto_cuda") is False


def test_the_adapter_covers_the_layers_it_names_and_quantises_only_those(tmp_path):
    model = nn.Sequential(layer(64, 8), layer(64, 8), layer(48, 8))
    pairs = {"0": (torch.randn(2, 64), torch.randn(8, 2)), "2": (torch.randn(2, 48), torch.randn(8, 2))}
    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    read = []
    done = quantize_transformer(Quantization(transformer="uint3", ara=str(tmp_path / "adapter.safetensors")), model,
                                dtype=torch.float32, read_ara=lambda path: read.append(path) or pairs)
    assert done.transformer_layers == ["0"]  # "2" is named but has 48 inputs; "1" is not named
    assert done.ara.modules == ("0", "2") and read == [tmp_path / "adapter.safetensors"]
    x = torch.randn(3, 64)
    down, up = pairs["0"]
    assert torch.equal(model[0](x), nn.functional.linear(x, model[0].dequantized(), model[0].bias) + x @ down.T @ up.T)


def test_a_missing_adapter_names_what_to_fetch(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    local = tmp_path / "ara.safetensors"
    local.write_bytes(b"x")
    assert ara_file(str(local)) == local
    with pytest.raises(ModelNotFound, match="fetch it with `hf download ostris/adapters qwen.safetensors`"):
        ara_file("ostris/adapters/qwen.safetensors")
    with pytest.raises(ModelNotFound, match="file not found"):
        ara_file(str(tmp_path / "nowhere.safetensors"))


def test_the_lora_branch_is_float32_rounded_once_to_the_layer_dtype_then_added():
    base = layer(32, 16, torch.bfloat16)
    down, up = torch.randn(4, 32).bfloat16().float(), torch.randn(16, 4).bfloat16().float()
    branches = BranchSet(base, "lora", torch.float32)
    branches.load({"": (down, up)}, multiplier=0.75)
    x = torch.randn(8, 32).bfloat16()
    with torch.no_grad():
        plain = nn.functional.linear(x, base.weight, base.bias)
        delta = nn.functional.linear(nn.functional.linear(x.float(), down), up) * 0.75
        got = base(x)
    assert torch.equal(got, plain + delta.to(torch.bfloat16))
    # What peft does instead (adds in float32, rounds the sum) differs in the last bit somewhere.
    assert not torch.equal(got, (plain.float() + delta).to(torch.bfloat16))
    branches.multiplier = 0
    assert torch.equal(base(x), plain)


def test_branches_stack_after_the_base_in_order_and_swap_in_place():
    base = layer(32, 16)
    ara, lora = BranchSet(base, "ara", torch.float32), BranchSet(base, "lora", torch.float32)
    ara_pair = (torch.randn(8, 32), torch.randn(16, 8))
    ara.load({"": ara_pair})
    assert lora.load({"": (torch.randn(4, 32), torch.randn(16, 4))}) == "attached"
    second = (torch.randn(4, 32), torch.randn(16, 4))
    assert lora.load({"": second}) == "copied"
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = (nn.functional.linear(x, base.weight, base.bias) + x @ ara_pair[0].T @ ara_pair[1].T) \
            + x @ second[0].T @ second[1].T
        assert torch.equal(base(x), expected)
        lora.clear()
        assert not hasattr(base, "lora_down") and torch.equal(
            base(x), nn.functional.linear(x, base.weight, base.bias) + x @ ara_pair[0].T @ ara_pair[1].T)


def test_the_quantisation_a_render_needs():
    source = ModelSource(path="m", quantize_text_encoder="qfloat8")
    spec = RenderSpec(model="qwen_image_2512", prompt="x")
    assert Quantization.of(spec, source) == Quantization(text_encoder="qfloat8")  # the configured default
    quantised = spec.model_copy(update={"aitk": AitkOptions(quantize=True, qtype="uint3", ara="a/b/c.safetensors",
                                                            quantize_te=False)})
    assert Quantization.of(quantised, source) == Quantization(transformer="uint3", ara="a/b/c.safetensors")
    reference = quantised.model_copy(update={"parity": "reference"})
    assert Quantization.of(reference, source) == Quantization(text_encoder="qfloat8")
    loaded = Quantization(text_encoder="qfloat8")
    assert loaded.refusals(spec, source) == [] and loaded.refusals(reference, source) == []
    [refusal] = loaded.refusals(quantised, source)
    assert refusal.startswith("quantization: this pipeline is loaded with") and "'uint3'" in refusal
