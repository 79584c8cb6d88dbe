import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from previewd.intake.safetensors_header import CorruptSafetensors, TruncatedSafetensors, inspect, read_header


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "my_lora_000000250.safetensors"
    save_file({"a.lora_A.weight": np.ones((4, 8), np.float16), "a.lora_B.weight": np.zeros((8, 4), np.float16)},
              str(path), metadata={"training_info": '{"step": 250, "epoch": 0}', "name": "my_lora"})
    return path


def test_complete_file(checkpoint):
    header, metadata = read_header(checkpoint)
    assert set(header) == {"a.lora_A.weight", "a.lora_B.weight"}
    assert json.loads(metadata["training_info"])["step"] == 250
    assert inspect(checkpoint).complete


@pytest.mark.parametrize("keep", [0, 5, 8, 20, -1])
def test_truncated_file_is_incomplete(checkpoint, keep):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    if 0 <= keep <= 20:  # not even the whole header yet
        with pytest.raises(TruncatedSafetensors):
            read_header(checkpoint)
    else:
        assert inspect(checkpoint).complete is False


def test_trailing_bytes_are_corrupt(checkpoint):
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(CorruptSafetensors, match="accounts for"):
        inspect(checkpoint)


@pytest.mark.parametrize("blob", [b"not json!", b"[1, 2]", json.dumps({"t": {"data_offsets": [4, 2]}}).encode()])
def test_corrupt_header(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    with pytest.raises(CorruptSafetensors):
        read_header(path)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x03\x04" + b"\xff" * 60)  # e.g. a zip/pickle renamed to .safetensors
    with pytest.raises(CorruptSafetensors, match="limits.header_mb"):
        inspect(path)
