"""Restoring touched weights from a model's safetensors files: only those tensors, cast as
from_pretrained cast them, bit for bit; on a GPU through the pinned staging buffers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from previewd.errors import PipelineError
from previewd.pipelines.base_weights import BaseWeights


def model_and_files(tmp_path, dtype: torch.dtype) -> tuple[nn.Module, BaseWeights, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    # Layers of growing size, so the staging buffers are reused and also have to grow.
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 64), nn.Linear(64, 16), nn.Linear(16, 256))
    saved = {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}
    save_file(saved, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return model.to(dtype), BaseWeights.find(tmp_path), saved


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_only_the_named_layers_come_back_bit_for_bit(tmp_path, device):
    model, files, saved = model_and_files(tmp_path, torch.bfloat16)
    model.to(device)
    with torch.no_grad():
        for layer in model:
            layer.weight.add_(1.0)
    assert files.restore(model, ["1", "2", "3"]) == 3
    for index in (1, 2, 3):
        assert torch.equal(model[index].weight.cpu(), saved[f"{index}.weight"].to(torch.bfloat16))
    assert not torch.equal(model[0].weight.cpu(), saved["0.weight"].to(torch.bfloat16))


def test_a_layer_missing_from_the_files_or_the_model_is_an_error(tmp_path):
    model, files, _ = model_and_files(tmp_path, torch.float32)
    with pytest.raises(PipelineError, match="7.weight: not found"):
        files.restore(model, ["7"])
