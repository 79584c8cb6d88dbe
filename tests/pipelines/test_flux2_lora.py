"""ai-toolkit FLUX.2 LoRAs: BFL key mapping, refusal, fp32 merge, bit-identical restore."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flux2_helpers import flux2_loras, tiny_pipe, tiny_transformer  # noqa: F401  (fixtures)
from previewd.errors import LoraError
from previewd.pipelines.flux2 import lora as flux2_lora


def weights(transformer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in transformer.named_parameters()}


def test_bfl_names_map_to_diffusers_weights(tiny_transformer):
    names = set(dict(tiny_transformer.named_parameters()))
    target = flux2_lora.resolve_target("double_blocks.0.txt_attn.qkv", names)
    assert target.params == ("transformer_blocks.0.attn.add_q_proj.weight", "transformer_blocks.0.attn.add_k_proj.weight",
                             "transformer_blocks.0.attn.add_v_proj.weight")
    assert flux2_lora.resolve_target("single_blocks.0.linear2", names).params == (
        "single_transformer_blocks.0.attn.to_out.weight",)
    assert flux2_lora.resolve_target("final_layer.adaLN_modulation.1", names).swap_halves
    assert flux2_lora.resolve_target("transformer_blocks.0.ff.linear_in", names).params == (
        "transformer_blocks.0.ff.linear_in.weight",)
    assert flux2_lora.resolve_target("double_blocks.7.img_attn.qkv", names) is None


def test_merge_is_ai_toolkits_fp32_formula_on_the_fused_qkv(tiny_transformer, flux2_loras):
    base = weights(tiny_transformer)
    modules = flux2_lora.read_lora(str(flux2_loras / "lora_a.safetensors"))
    merger = flux2_lora.LoraMerger(tiny_transformer)
    merger.apply(modules, 0.75, ("a", 0.75))
    try:
        lora = modules["double_blocks.0.img_attn.qkv"]
        fused = torch.cat([base[f"transformer_blocks.0.attn.to_{x}.weight"] for x in "qkv"])
        expected = (fused.float() + 0.75 * (lora.up.float() @ lora.down.float()) * 1.0).to(fused.dtype)
        merged = torch.cat([tiny_transformer.get_parameter(f"transformer_blocks.0.attn.to_{x}.weight")
                            for x in "qkv"])
        assert torch.equal(merged, expected)
    finally:
        merger.restore()
    assert all(torch.equal(p, base[n]) for n, p in tiny_transformer.named_parameters())


@pytest.mark.slow
def test_switching_back_and_forth_restores_base_bit_identically(tiny_pipe, flux2_loras):
    from flux2_helpers import spec

    from previewd.spec import LoraSpec

    base = weights(tiny_pipe.transformer)
    touched = set()
    for name, multiplier in [("lora_a", 1.0), ("lora_b", 1.0), ("lora_a", 0.5), ("lora_a", 1.0), ("lora_b", 0.3)]:
        tiny_pipe.set_lora(spec(lora=LoraSpec(path=str(flux2_loras / f"{name}.safetensors"),
                                              network_multiplier=multiplier)))
        now = weights(tiny_pipe.transformer)
        touched |= {n for n in base if not torch.equal(now[n], base[n])}
    assert touched
    tiny_pipe.set_lora(spec())
    assert all(torch.equal(p, base[n]) for n, p in tiny_pipe.transformer.named_parameters())
    # Restored from the model files: no copy of the touched weights is kept in host memory.
    assert tiny_pipe.merger._copies == {}


def test_without_model_files_the_touched_weights_are_copied_and_restored(tiny_transformer, flux2_loras):
    base = weights(tiny_transformer)
    merger = flux2_lora.LoraMerger(tiny_transformer)
    merger.apply(flux2_lora.read_lora(str(flux2_loras / "lora_a.safetensors")), 1.0, ("a", 1.0))
    touched = {n for n, p in tiny_transformer.named_parameters() if not torch.equal(p, base[n])}
    merger.restore()
    assert all(torch.equal(p, base[n]) for n, p in tiny_transformer.named_parameters())
    assert set(merger._copies) == touched and len(touched) < len(base)


def test_unmatched_keys_and_other_lora_types_are_refused(tiny_transformer, tmp_path):
    def write(tensors):
        path = tmp_path / f"l{len(list(tmp_path.iterdir()))}.safetensors"
        save_file(tensors, str(path))
        return str(path)

    a, b = torch.zeros(4, 32), torch.zeros(96, 4)
    wrong = write({"diffusion_model.double_blocks.3.img_attn.qkv.lora_A.weight": a,
                   "diffusion_model.double_blocks.3.img_attn.qkv.lora_B.weight": b})
    with pytest.raises(LoraError, match="match no FLUX.2"):
        flux2_lora.plan_merge(flux2_lora.read_lora(wrong), tiny_transformer)
    misshaped = write({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": a,
                       "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraError, match="shape"):
        flux2_lora.plan_merge(flux2_lora.read_lora(misshaped), tiny_transformer)
    lokr = write({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.zeros(2, 2),
                  "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.zeros(48, 16)})
    with pytest.raises(LoraError, match="LoKr"):
        flux2_lora.read_lora(lokr)
    with pytest.raises(LoraError, match="not a LoRA weight"):
        flux2_lora.read_lora(write({"diffusion_model.img_in.weight": torch.zeros(32, 128)}))
    with pytest.raises(LoraError, match="lacks"):
        flux2_lora.read_lora(write({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 128)}))
    with pytest.raises(LoraError):
        flux2_lora.read_lora(str(tmp_path / "missing.safetensors"))


def test_kohya_alpha_scales_the_delta(tiny_transformer, tmp_path):
    a, b = torch.randn(4, 128), torch.randn(32, 4)
    path = tmp_path / "kohya.safetensors"
    save_file({"diffusion_model.img_in.lora_down.weight": a, "diffusion_model.img_in.lora_up.weight": b,
               "diffusion_model.img_in.alpha": torch.tensor(2.0)}, str(path))
    modules = flux2_lora.read_lora(str(path))
    assert modules["img_in"].scale == 0.5
    base = tiny_transformer.x_embedder.weight.detach().clone()
    merger = flux2_lora.LoraMerger(tiny_transformer)
    merger.apply(modules, 1.0, ("k",))
    try:
        assert torch.equal(tiny_transformer.x_embedder.weight, base + (1.0 * (b @ a)) * 0.5)
    finally:
        merger.restore()
