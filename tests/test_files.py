"""`hf_moe_cl.files`: a safetensors file is checked before it is read; a malformed header or a tensor that does not
fit its data offsets is named with the file, and files of every common dtype pass."""

import json

import pytest
import torch

from hf_moe_cl.files import check_safetensors_file


@pytest.mark.parametrize("header", [[1, 2], {"w": {"dtype": "F32", "shape": [1]}}, {"w": "x"}])
def test_malformed_safetensors_headers_are_named(tmp_path, header):
    path = tmp_path / "bad.safetensors"
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(ValueError, match="malformed safetensors header"):
        check_safetensors_file(path)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]},  # 4 elements need 16 bytes
    {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]},
    {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]},
    {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
    {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
])
def test_a_safetensors_header_whose_tensor_does_not_fit_its_offsets_is_named(tmp_path, entry):
    from hf_moe_cl.files import check_safetensors_file

    path = tmp_path / "adapter_model.safetensors"
    raw = json.dumps({"w": entry}).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(16))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors has a malformed safetensors header: tensor 'w' "
                                         r"\(dtype .*\) does not fit its data offsets"):
        check_safetensors_file(path)


def test_a_safetensors_file_of_every_common_dtype_passes_the_check(tmp_path):
    from safetensors.torch import save_file

    from hf_moe_cl.files import check_safetensors_file

    tensors = {"bf16": torch.zeros(3, 2, dtype=torch.bfloat16), "empty": torch.zeros(0, 4), "scalar": torch.tensor(1.),
               "bool": torch.zeros(5, dtype=torch.bool), "int": torch.zeros(2, 3, dtype=torch.int64),
               "fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "ok.safetensors"))
    check_safetensors_file(tmp_path / "ok.safetensors")  # no false refusal


@pytest.mark.parametrize("target", ["real", "nowhere"])
def test_an_atomic_folder_behind_a_symbolic_link_is_refused_and_nothing_is_left(tmp_path, target):
    """Replacing the path would replace the link (writing nothing where it points) and fail on cleanup."""
    from hf_moe_cl.files import atomic_folder

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / target)
    with pytest.raises(ValueError, match=rf"link is a symbolic link \(to {tmp_path / target}\); give the folder "
                                         r"itself or a new path"):
        with atomic_folder(tmp_path / "link"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"] and not any((tmp_path / "real").iterdir())
