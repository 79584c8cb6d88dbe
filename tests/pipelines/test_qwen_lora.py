"""LoRA file reading and normalisation (previewd.pipelines.lora); no models involved."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from previewd.errors import LoraError
from previewd.pipelines.lora import load_lora, normalize

MODULES = {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "proj_out"}


def _pair(rank=4, out=8, inp=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def _aitk(modules=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj")):
    sd = {}
    for i, m in enumerate(modules):
        a, b = _pair(seed=i)
        sd[f"diffusion_model.{m}.lora_A.weight"] = a.to(torch.bfloat16)
        sd[f"diffusion_model.{m}.lora_B.weight"] = b.to(torch.bfloat16)
    return sd


def test_aitk_keys_become_diffusers_keys_unchanged():
    sd = _aitk()
    weights = normalize(sd, module_names=MODULES)
    assert weights.modules == ["transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_q"]
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert torch.equal(weights.state_dict[key], sd["diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight"])
    assert weights.state_dict[key].dtype == torch.bfloat16
    assert not weights.unmatched and weights.source_format == "peft"


def test_diffusers_prefix_gives_the_same_state_dict_as_aitk():
    aitk = normalize(_aitk(), module_names=MODULES)
    diffusers = normalize({k.replace("diffusion_model.", "transformer."): v for k, v in _aitk().items()},
                          module_names=MODULES)
    assert aitk.state_dict.keys() == diffusers.state_dict.keys()
    assert all(torch.equal(aitk.state_dict[k], diffusers.state_dict[k]) for k in aitk.state_dict)


@pytest.mark.parametrize("flat", [False, True])
def test_kohya_down_up_alpha_is_folded_into_a(flat):
    a, b = _pair(rank=4)
    name = "lora_unet_transformer_blocks_0_attn_to_q" if flat else "diffusion_model.transformer_blocks.0.attn.to_q"
    sd = {f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b, f"{name}.alpha": torch.tensor(2.0)}
    weights = normalize(sd, module_names=MODULES)
    assert weights.modules == ["transformer_blocks.0.attn.to_q"]
    got_a = weights.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    got_b = weights.state_dict["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    torch.testing.assert_close(got_b @ got_a, (b @ a) * 0.5)
    assert weights.alpha_folded and weights.source_format == "kohya"


def test_alpha_equal_to_rank_changes_nothing():
    a, b = _pair(rank=4)
    sd = {"diffusion_model.proj_out.lora_down.weight": a, "diffusion_model.proj_out.lora_up.weight": b,
          "diffusion_model.proj_out.alpha": torch.tensor(4.0)}
    weights = normalize(sd, module_names=MODULES)
    assert torch.equal(weights.state_dict["transformer.proj_out.lora_A.weight"], a)


def test_lora_matching_no_module_is_refused():
    with pytest.raises(LoraError, match="none of the 2 LoRA modules"):
        normalize(_aitk(("single_blocks.0.linear1", "double_blocks.0.img_attn.qkv")), module_names=MODULES)


def test_unprefixed_keys_that_match_nothing_are_refused_not_ignored():
    sd = {k.replace("diffusion_model.", "unet."): v for k, v in _aitk().items()}
    with pytest.raises(LoraError):
        normalize(sd, module_names=MODULES)


def test_partly_matching_lora_reports_and_drops_the_rest():
    weights = normalize(_aitk(("transformer_blocks.0.attn.to_q", "transformer_blocks.9.attn.to_q")),
                        module_names=MODULES)
    assert weights.unmatched == ["transformer_blocks.9.attn.to_q"]
    assert weights.modules == ["transformer_blocks.0.attn.to_q"]
    assert all("blocks.9" not in k for k in weights.state_dict)


@pytest.mark.parametrize("sd, message", [
    ({"diffusion_model.proj_out.lora_A.weight": torch.zeros(4, 6)}, "only one of its two"),
    ({"diffusion_model.proj_out.lokr_w1": torch.zeros(4, 4)}, "unsupported LoRA variant"),
    ({"diffusion_model.proj_out.weight": torch.zeros(4, 4)}, "not LoRA weights"),
    ({"diffusion_model.proj_out.lora_A.weight": torch.zeros(4, 6),
      "diffusion_model.proj_out.lora_B.weight": torch.zeros(8, 3)}, "incompatible LoRA shapes"),
])
def test_malformed_files_are_refused(sd, message):
    with pytest.raises(LoraError, match=message):
        normalize(sd, module_names=MODULES)


def test_load_lora_reads_safetensors_with_metadata(tmp_path):
    path = tmp_path / "x_000000250.safetensors"
    save_file(_aitk(), str(path), metadata={"training_info": '{"step": 250, "epoch": 0}'})
    weights = load_lora(path, module_names=MODULES)
    assert weights.metadata["training_info"] == '{"step": 250, "epoch": 0}'
    assert len(weights.state_dict) == 4


def test_pickle_files_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(LoraError, match="not a readable safetensors"):
        load_lora(path)


def test_missing_file_is_a_lora_error(tmp_path):
    with pytest.raises(LoraError, match="not found"):
        load_lora(tmp_path / "nope.safetensors")
