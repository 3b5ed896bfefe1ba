"""A saved MoE-LoRA adapter read back: what loading needs (`import hf_moe_cl`, the weights file, a readable config),
the base model it fits (depth, widths, the pretrained weights it was created on: `base_weights`), every value of its
tensors and config checked with the file named, and the layouts of earlier versions (the 0.2 peft type name, the 0.1
selector files)."""

import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import CLIPModel

from hf_moe_cl import MoELoraConfig

from conftest import edited, flip_lowest_bits, moe_model, rerecord, tiny_clip


TESTS = os.path.dirname(os.path.abspath(__file__))


# ----- what loading needs --------------------------------------------------------------------------------------------
def test_loading_without_importing_the_library_says_what_to_do(tmp_path):
    moe_model().save_pretrained(tmp_path)
    script = (f"import sys; sys.path.insert(0, {TESTS!r})\nfrom peft import PeftModel\nfrom conftest import tiny_clip\n"
              f"PeftModel.from_pretrained(tiny_clip(), {str(tmp_path)!r})")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "KeyError: 'MOE_LORA'" in result.stderr
    # the file stores the plain type; the card beside it says what the KeyError means
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOE_LORA"
    assert "`import hf_moe_cl` before loading it with peft (without it peft raises `KeyError: 'MOE_LORA'`)" in (
        tmp_path / "README.md").read_text()


def test_a_folder_written_with_the_old_peft_type_name_loads(tmp_path, clip_inputs):
    model = moe_model(init_weights=False).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "MOE_LORA (needs `import hf_moe_cl` before loading)"  # what 0.2 stored
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).eval()
    model.set_task(1), loaded.set_task(1)
    assert torch.equal(loaded(**clip_inputs).logits_per_image, model(**clip_inputs).logits_per_image)


def test_a_missing_weights_file_is_named(tmp_path):
    moe_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors: the adapter's weights are missing"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


@pytest.mark.parametrize("content, message", [
    ('{"peft_type": ', r"adapter_config.json is not valid JSON \(14 bytes; Expecting value.*\)\. Delete it and save "
                      r"or download it again\."),
    ("\xff\xfe", r"adapter_config.json is not valid JSON .*Delete it and save or download it again\."),
    ('["a list"]', r"adapter_config.json should hold a JSON object\. Delete it and save or download it again\."),
], ids=["truncated", "not text", "a list"])
def test_a_malformed_adapter_config_is_named_by_every_loader(tmp_path, content, message):
    """peft parses adapter_config.json before it knows the method: every loader names the file, the cause and the
    fix, never a bare JSONDecodeError."""
    from peft import AutoPeftModel

    from hf_moe_cl import TaskAgnosticClassifier

    moe_model().save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_bytes(content.encode("latin-1"))
    for load in (lambda: MoELoraConfig.from_pretrained(str(tmp_path)),
                 lambda: PeftModel.from_pretrained(tiny_clip(), tmp_path),
                 lambda: AutoPeftModel.from_pretrained(str(tmp_path)),
                 lambda: moe_model().load_adapter(str(tmp_path), adapter_name="second"),
                 lambda: TaskAgnosticClassifier.from_pretrained(str(tmp_path))):
        with pytest.raises(ValueError, match=message) as error:
            load()
        assert str(tmp_path / "adapter_config.json") in str(error.value)


def test_a_missing_path_or_damaged_adapter_config_is_named_before_any_hub_call(tmp_path, monkeypatch):
    """`TaskAgnosticClassifier.from_pretrained` (and the pipeline's loader) on a path that does not exist, or on a
    folder whose adapter_config.json is truncated, name the path or the file, not a Hub or JSON error."""
    from huggingface_hub import HfApi

    from hf_moe_cl import TaskAgnosticClassifier
    from hf_moe_cl.pipeline import MoELoraCLIP

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(HfApi, "model_info", refuse)
    missing = tmp_path / "no-such-run" / "adapter"
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repo id"):
        TaskAgnosticClassifier.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="neither a folder here nor a Hub repo id"):
        MoELoraCLIP.from_pretrained(str(missing))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "adapter_config.json").write_text('{"peft_type": "MOE_LO')
    with pytest.raises(ValueError, match="adapter_config.json"):
        TaskAgnosticClassifier.from_pretrained(str(damaged))


# ----- integrity: the bytes read are the bytes saved -----------------------------------------------------------------
@pytest.mark.parametrize("damage", ["bit flips", "another adapter's weights"])
def test_a_damaged_or_swapped_weights_file_is_refused_naming_it(tmp_path, damage, caplog):
    moe_model(init_weights=False).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    if damage == "bit flips":  # the lowest bit of every float: same size, same header, values a hair off
        flip_lowest_bits(weights)
    else:
        other = moe_model(init_weights=False)
        with torch.no_grad():
            next(p for p in other.parameters() if p.requires_grad).add_(1.0)
        other.save_pretrained(tmp_path / "b")
        weights.write_bytes((tmp_path / "b" / "adapter_model.safetensors").read_bytes())
    for load in (lambda: PeftModel.from_pretrained(tiny_clip(), tmp_path / "a"),
                 lambda: moe_model().load_adapter(tmp_path / "a", adapter_name="second")):
        with pytest.raises(ValueError, match=r"a/adapter_model.safetensors is not the file that was saved: its sha256 "
                                             r"differs from the one .*adapter_config.json records.*Save or download"):
            load()


def test_an_adapter_saved_without_hashes_loads_with_one_warning(tmp_path, caplog):
    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), file_sha256=None)))
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert caplog.text.count("records no sha256 of its files") == 1


def test_a_saved_record_names_the_weights_file_and_is_kept_apart_from_documented_edits(tmp_path):
    from hf_moe_cl.files import file_hashes

    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    assert values["file_sha256"] == file_hashes(tmp_path, ["adapter_model.safetensors"])
    path.write_text(json.dumps(dict(values, top_k=1)))  # an edit the docs allow: the weights are untouched
    assert PeftModel.from_pretrained(tiny_clip(), tmp_path).peft_config["default"].top_k == 1


@pytest.mark.parametrize("content", ["pickle", "not torch"])
def test_a_weights_bin_that_torch_cannot_load_safely_is_named(tmp_path, content):
    import pickle

    moe_model().save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}) if content == "pickle" else b"not a torch file")
    rerecord(tmp_path)
    with pytest.raises(ValueError, match=r"adapter_model.bin is not a state dict torch can load safely .*Save the "
                                         r"adapter again with save_pretrained"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


# ----- the base model it fits ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [3, 1])
def test_an_adapter_for_another_depth_is_refused(tmp_path, layers):
    moe_model().save_pretrained(tmp_path)
    other = tiny_clip()
    deeper = type(other)(other.config.__class__(**{**other.config.to_dict(), "vision_config": {
        **other.config.vision_config.to_dict(), "num_hidden_layers": layers}}))
    with pytest.raises(ValueError, match="created on a base model of another layout"):
        PeftModel.from_pretrained(deeper, tmp_path)
    with pytest.raises(ValueError, match="as when the base model has more or fewer layers"):  # loaded on purpose
        PeftModel.from_pretrained(deeper, tmp_path, config=_without_record(tmp_path))


def test_a_shape_mismatch_message_names_no_missing_base(tmp_path):
    moe_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match this model") as error:
        PeftModel.from_pretrained(tiny_clip(vision_width=64), tmp_path, config=_without_record(tmp_path))
    assert "(None)" not in str(error.value) and "Load it on the base model it was trained on" in str(error.value)


def _clip_with(**changes):
    """tiny_clip() with `changes` to its config (`vision_config` / `text_config` entries: dicts of changes)."""
    config = tiny_clip().config.to_dict()
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    return CLIPModel(type(tiny_clip().config)(**config)).eval()


@pytest.mark.parametrize("changes", [{"projection_dim": 24}, {"vision_config": {"image_size": 32}},
                                     {"text_config": {"vocab_size": 90}}])
def test_an_adapter_is_refused_on_a_base_of_another_layout(tmp_path, changes, caplog):
    """Adapter tensors fit any CLIP of the same widths and depth: the layout record tells the others apart."""
    moe_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="created on a base model of another layout.*projection_dim, image size, "
                                         "vocabulary"):
        PeftModel.from_pretrained(_clip_with(**changes), tmp_path)
    PeftModel.from_pretrained(_clip_with(**changes), tmp_path, config=_without_record(tmp_path))  # on purpose


def test_the_classifier_refuses_an_adapter_on_a_base_of_another_layout(tmp_path):
    from hf_moe_cl import TaskAgnosticClassifier

    moe_model().save_pretrained(tmp_path / "adapter")
    _clip_with(projection_dim=24).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="created on a base model of another layout"):
        TaskAgnosticClassifier.from_pretrained(str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "other"))


@pytest.mark.parametrize("edit", ["layout", "dtype", "drop"])
def test_editing_one_field_of_the_base_record_is_refused_or_warned(tmp_path, edit, caplog):
    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    record = values["base_weights"]
    if edit == "drop":
        del record["layout"]
    else:
        record[edit] = "0" * 16 if edit == "layout" else "bfloat16"
    path.write_text(json.dumps(values))
    if edit == "drop":
        with pytest.raises(ValueError, match="`base_weights` must be None or.*damaged or edited"):
            PeftModel.from_pretrained(tiny_clip(), tmp_path)
        return
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):  # the same weights: loaded, and the edit is said
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert "its `layout` or `dtype` was edited" in caplog.text
    if edit == "layout":
        with pytest.raises(ValueError, match="another layout"):
            PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)  # another base is still refused
    else:
        with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):  # another dtype: never compared silently
            PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)
        assert "created on bfloat16 base weights and is loaded on float32 ones: whether they are the same" in caplog.text


def test_an_adapter_config_without_a_base_record_loads_with_a_warning(tmp_path, caplog):
    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), base_weights=None)))
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)
    assert "records no `base_weights`" in caplog.text and "cannot be checked" in caplog.text


def test_the_base_fingerprint_ignores_the_adapters_initialisation():
    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_fingerprint

    torch.manual_seed(0)
    first = moe_model()
    second = moe_model(init_weights=False)  # other adapter values, same base
    assert base_weights_fingerprint(first) == base_weights_fingerprint(second) == base_weights_fingerprint(
        tiny_clip())
    assert base_weights_fingerprint(tiny_clip(seed=1)) != base_weights_fingerprint(tiny_clip())


def test_an_adapter_is_refused_on_other_pretrained_weights_of_the_same_shape(tmp_path, clip_inputs, caplog):
    from peft import PeftConfig, PeftModel

    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_record

    model = moe_model()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["base_weights"]
    assert saved == base_weights_record(tiny_clip())

    other = tiny_clip(seed=1)
    untouched = {name: p.clone() for name, p in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"created on other pretrained weights.*base_weights=None"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any("moe_lora" in name for name, _ in other.named_modules())  # refused before any injection
    assert all(torch.equal(untouched[n], p) for n, p in other.state_dict().items())

    same = PeftModel.from_pretrained(tiny_clip(), tmp_path)  # the base it was created on
    with torch.no_grad():
        model.set_task(1), same.set_task(1)
        assert torch.equal(model(**clip_inputs).logits_per_image, same(**clip_inputs).logits_per_image)

    host = moe_model()  # load_adapter into a model of other weights is refused the same way
    host_other = PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=_without_record(tmp_path))
    with pytest.raises(ValueError, match="created on other pretrained weights"):
        host_other.load_adapter(tmp_path, adapter_name="second")
    host.load_adapter(tmp_path, adapter_name="second")

    config = PeftConfig.from_pretrained(tmp_path)  # on purpose: the documented way round
    config.base_weights = None
    PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=config)

    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):  # another dtype cannot be compared: said, not silent
        PeftModel.from_pretrained(tiny_clip(seed=1).to(torch.bfloat16), tmp_path)
    assert "created on float32 base weights and is loaded on bfloat16 ones" in caplog.text


def _without_record(folder):
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(folder)
    config.base_weights = None
    return config


@pytest.mark.parametrize("record", ["abc", {"sha256": "0" * 16}, {"sha256": "z" * 16, "dtype": "float32",
                                                                   "layout": "0" * 16}])
def test_a_damaged_base_weights_record_is_named(tmp_path, record):
    from peft import PeftModel

    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), base_weights=record)))
    with pytest.raises(ValueError, match="`base_weights` must be None or.*damaged or edited"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_an_adapter_saved_before_the_record_loads_and_gains_it(tmp_path):
    from peft import PeftModel

    from hf_moe_cl.tuners.moe_lora.base_weights import base_weights_record

    moe_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "base_weights"}))
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].base_weights == base_weights_record(tiny_clip())


# ----- values read back from the saved files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter") / "good"
    moe_model(init_weights=False).save_pretrained(folder)
    return folder


def damaged_copy(saved_adapter, tmp_path, tensor=None, change=None, config=None):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(saved_adapter, folder)
    if tensor is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        key = next(k for k in sorted(weights) if k.endswith("." + tensor))
        weights[key] = change(weights[key].clone())
        save_file(weights, folder / "adapter_model.safetensors")
        rerecord(folder)  # recorded as a save would: the values checks meet it, not the integrity check
    if config is not None:
        values = json.loads((folder / "adapter_config.json").read_text())
        values.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(values))
    return folder


def set_first(value):
    def change(tensor):
        tensor.view(-1)[0] = value
        return tensor
    return change


@pytest.mark.parametrize("tensor, change, message", [
    ("moe_lora_A", set_first(math.nan), "moe_lora_A.default' holds 1 NaN or infinite value"),
    ("moe_lora_B", lambda t: t.fill_(math.inf), "moe_lora_B.default' holds 512 NaN or infinite value"),
    ("moe_lora_router_gate", set_first(-math.inf), "moe_lora_router_gate.default' holds 1 NaN or infinite"),
    ("moe_lora_bias_A", lambda t: t.long(), "moe_lora_bias_A.default' has dtype torch.int64; weights are floating"),
    ("moe_lora_frozen_by", set_first(99), r"frozen_by.default' holds values from -1 to 99; it holds integers in "
                                          r"\[-1, 1\] \(2 task routers\)"),
    ("moe_lora_frozen_by", set_first(-5), r"frozen_by.default' holds values from -5 to -1"),
    ("moe_lora_frozen_by", lambda t: t.float(), "frozen_by.default' has dtype torch.float32"),
    ("moe_lora_counts", set_first(-3), "counts.default' holds values from -3 to 0; it holds integers >= 0"),
    ("moe_lora_router_frozen", lambda t: t.long() + 7, "router_frozen.default' has dtype torch.int64; it holds "
                                                       "booleans"),
])
def test_invalid_values_in_a_saved_adapters_tensors_are_named(saved_adapter, tmp_path, tensor, change, message):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, tensor, change)
    with pytest.raises(ValueError, match=r"checkpoint \(adapter_model.safetensors\) holds invalid values: .*" + message):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_invalid_values_met_when_resuming_name_the_file(saved_adapter, tmp_path):
    from hf_moe_cl.continual.methods import MoEAdapters

    folder = damaged_copy(saved_adapter, tmp_path, "moe_lora_A", set_first(math.nan))
    with pytest.raises(ValueError, match=f"{folder / 'adapter_model.safetensors'}: .* holds 1 NaN"):
        MoEAdapters(moe_model()).load(folder)


@pytest.mark.parametrize("config, message", [
    ({"expert_bias": "false"}, "`expert_bias` must be a boolean"),
    ({"noisy_gating": "false"}, "`noisy_gating` must be a boolean"),
    ({"num_tasks": "2"}, "`num_tasks` must be an integer >= 1, got '2'"),
    ({"experts_per_module": [1]}, "`experts_per_module` must be a dict"),
    ({"target_modules": 5}, "`target_modules` must be None, a string or a list of strings"),
    ({"selector": {"feature_dim": 8, "standardize": "false"}}, "`selector.standardize` must be None or a boolean"),
])
def test_wrongly_typed_values_in_a_saved_adapter_config_name_the_file(saved_adapter, tmp_path, config, message):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, config=config)
    with pytest.raises(ValueError, match=f"{folder / 'adapter_config.json'} holds an invalid value: {message}"):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_experts_per_module_naming_no_adapted_module_is_refused(saved_adapter, tmp_path):
    from peft import PeftModel

    folder = damaged_copy(saved_adapter, tmp_path, config={"experts_per_module": {"vision_model.layers.0": 6}})
    with pytest.raises(ValueError, match=r"`experts_per_module` of adapter 'default' names modules the adapter does "
                                         r"not adapt in this model: \['vision_model.layers.0'\]"):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_base_model_tensors_in_the_weights_file_are_refused_not_loaded_over_the_base(saved_adapter, tmp_path):
    from safetensors.torch import load_file

    folder = damaged_copy(saved_adapter, tmp_path)
    weights = load_file(folder / "adapter_model.safetensors")
    weights.update({"base_model.model.logit_scale": torch.tensor(5.0),
                    "base_model.model.visual_projection.weight": torch.zeros(16, 48)})
    save_file(weights, folder / "adapter_model.safetensors")
    rerecord(folder)
    with pytest.raises(ValueError, match=r"holds 2 tensor\(s\) of the base model \(e.g. \['base_model.model."
                                         r"logit_scale', 'base_model.model.visual_projection.weight'\]\), which "
                                         r"loading would write over the base model's own weights"):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_an_adapters_own_tensors_outside_its_layers_load(tmp_path):
    model = moe_model(init_weights=False, modules_to_save=["visual_projection"])
    model.base_model.enable_selector({})
    with torch.no_grad():
        model.base_model.model.visual_projection.modules_to_save["default"].weight.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert float(loaded.base_model.model.visual_projection.modules_to_save["default"].weight.mean()) == 0.25
    assert loaded.base_model.selector is not None


@pytest.fixture(scope="module")
def grown_adapter(tmp_path_factory):
    """4 experts, task 0 froze 3 (and its router) in every layer, then every bank grew by 2 for task 1."""
    model = moe_model(init_weights=False, expert_growth_threshold=0.5)
    moe = model.base_model
    moe.set_selection_counts(0, {name: torch.tensor([5, 4, 3, 0]) for name in moe.moe_layers()})
    moe.freeze_most_selected(0, k=3)
    moe.grow_experts(1)
    folder = tmp_path_factory.mktemp("grown") / "good"
    model.save_pretrained(folder)
    return folder


LAYER0 = "vision_model.encoder.layers.0."


@pytest.mark.parametrize("tensor, value, message", [
    ("moe_lora_expert_task", [0, 0, 0, 1, 1, 1], r"expert_task.default' gives tasks \[0, 0, 0, 1\] to the bank's first "
                                                 r"4 experts \(`num_experts`\), which it had before any growth"),
    ("moe_lora_router_frozen", [False, False], r"frozen flags no training writes: moe_lora_router_frozen is "
                                               r"\[True, False\] in .* but \[False, False\] in '.*vision_model."
                                               r"encoder.layers.0'"),
    ("moe_lora_frozen_by", [0, 0, 0, 1, -1, -1], r"expert 3 of '.*vision_model.encoder.layers.0' is frozen by task 1 "
                                                 r"\(moe_lora_frozen_by\), whose router is not frozen"),
    ("moe_lora_frozen_by", [0, 0, 0, -1, 0, -1], r"expert 4 of .* is frozen by task 0 \(moe_lora_frozen_by\) but was "
                                                 r"added for task 1 \(moe_lora_expert_task\)"),
])
def test_frozen_state_and_growth_no_training_writes_are_refused(grown_adapter, tmp_path, tensor, value, message):
    loaded = PeftModel.from_pretrained(tiny_clip(), grown_adapter).base_model  # as saved, it loads
    assert loaded.frozen_experts()[LAYER0[:-1]] == {0: 0, 1: 0, 2: 0}
    assert loaded.moe_layers()[LAYER0[:-1]].moe_lora_expert_task["default"].tolist() == [0, 0, 0, 0, 1, 1]
    folder = edited(grown_adapter, tmp_path / "damaged", tensors={LAYER0 + tensor: torch.tensor(value)})
    with pytest.raises(ValueError, match=message + r".*save or download the adapter again"):
        PeftModel.from_pretrained(tiny_clip(), folder)


@pytest.mark.parametrize("num_experts, message", [
    (3, r"gives task 0 to experts after the bank's first 3 \(`num_experts`\): the first task trains on the whole bank"),
    (5, r"gives tasks \[0, 0, 0, 0, 1\] to the bank's first 5 experts"),
])
def test_a_grown_adapters_num_experts_edited_is_refused(grown_adapter, tmp_path, num_experts, message):
    """`num_experts` sizes every later growth and is no part of the settings hash: its bank's growth record tells."""
    folder = edited(grown_adapter, tmp_path / "edited", config={"num_experts": num_experts})
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_a_task_that_froze_no_expert_loads_with_its_router_frozen(tmp_path):
    model = moe_model(init_weights=False)
    model.base_model.freeze_most_selected(0)  # no selections counted: no expert frozen, the router is
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).base_model
    assert (loaded.frozen_routers(), sum(map(len, loaded.frozen_experts().values()))) == ([0], 0)


# ----- layouts of earlier versions -----------------------------------------------------------------------------------
def test_a_partial_legacy_selector_is_refused_not_dropped(tmp_path):
    moe_model().save_pretrained(tmp_path)
    save_file({"thresholds": torch.zeros(2)}, tmp_path / "ddas.safetensors")  # ddas_config.json is missing
    with pytest.raises(ValueError, match=r"holds a DDAS selector in \['ddas.safetensors'\]"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    from hf_moe_cl import upgrade_adapter_folder

    with pytest.raises(FileNotFoundError, match="has no ddas_config.json"):
        upgrade_adapter_folder(str(tmp_path))


def test_an_adapter_saved_over_a_legacy_folder_does_not_pick_up_its_selector(tmp_path, clip_inputs):
    (tmp_path / "ddas_config.json").write_text(json.dumps({"feature_dim": 16, "num_tasks": 2}))
    save_file({"thresholds": torch.zeros(2)}, tmp_path / "ddas.safetensors")
    moe_model().save_pretrained(tmp_path)  # no selector: the stale files must not come back as one
    with pytest.raises(ValueError, match="layout of hf-moe-cl 0.1"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


@pytest.mark.parametrize("edit", [
    lambda values: dict(task_info=list(reversed(values["task_info"]))),  # class names of the other router
    lambda values: dict(task_info=[dict(values["task_info"][0], classnames=["x", "y", "z"]), values["task_info"][1]]),
    lambda values: dict(expert_activation="gelu"),
    lambda values: dict(hide_frozen_experts=True),  # learned routers would select among other experts
], ids=["task records swapped", "class names edited", "activation edited", "hidden experts edited"])
def test_an_edit_of_settings_the_weights_were_trained_with_is_refused(tmp_path, edit):
    model = moe_model(init_weights=False)
    model.base_model.set_task_info(0, "first", ["red", "green", "blue"], ["a photo of {}."])
    model.base_model.set_task_info(1, "second", ["cat", "dog", "cow"], ["a photo of {}."])
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    values = json.loads(path.read_text())
    path.write_text(json.dumps(dict(values, **edit(values))))
    with pytest.raises(ValueError, match=r"adapter_config.json was edited in `task_info`, `selector`, "
                                         r"`expert_activation` or `hide_frozen_experts`.*set settings_sha256 to null to load the edit on "
                                         "purpose"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    path.write_text(json.dumps(dict(values, **edit(values), settings_sha256=None)))
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert loaded.peft_config["default"].task_info == edit(values).get("task_info", values["task_info"])


def test_a_missing_base_model_path_is_named_before_any_hub_call(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from hf_moe_cl import TaskAgnosticClassifier

    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: (_ for _ in ()).throw(AssertionError("the Hub was asked")))
    moe_model().save_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match=r"nobase is neither a folder here nor a Hub repo id"):
        TaskAgnosticClassifier.from_pretrained(str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "nobase"))


@pytest.mark.parametrize("saved_with, edit", [
    (["visual_projection"], ["text_projection"]),
    (["visual_projection"], ["visual_projection", "text_projection"]),
    (None, ["visual_projection"]),
])
def test_an_edited_modules_to_save_is_named_before_peft_fails_to_find_its_weights(tmp_path, saved_with, edit):
    source = moe_model(modules_to_save=saved_with).save_pretrained(tmp_path / "saved") or tmp_path / "saved"
    folder = edited(source, tmp_path / "edited", config={"modules_to_save": edit})
    missing = [name for name in edit if name not in (saved_with or [])]
    message = (rf"adapter_config.json was edited in `modules_to_save`: it names {re.escape(str(missing))}, but "
               r"adapter_model.safetensors beside it holds no trained copy of such a module \(the copies it holds: "
               + ("base_model.model.visual_projection" if saved_with else "none") + r"\)")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_clip(), folder)


def test_a_loader_option_peft_would_drop_is_refused_and_its_options_still_pass(tmp_path, monkeypatch):
    """peft's from_pretrained takes **kwargs and drops the ones it does not read (`base_model=` for the base CLIP)."""
    from hf_moe_cl import TaskAgnosticClassifier
    from hf_moe_cl.inference import load_adapter_model

    moe_model().save_pretrained(tmp_path / "adapter")
    tiny_clip().save_pretrained(tmp_path / "base")
    message = (r"Unknown keyword argument\(s\) \['base_model'\] for loading a MoE-LoRA adapter "
               r"\(PeftModel.from_pretrained\); the base CLIP is `base_model_name_or_path`")
    with pytest.raises(ValueError, match=message):
        TaskAgnosticClassifier.from_pretrained(str(tmp_path / "adapter"), base_model=str(tmp_path / "base"))
    model = load_adapter_model(str(tmp_path / "adapter"), str(tmp_path / "base"), is_trainable=True,
                               local_files_only=True, low_cpu_mem_usage=False)
    assert any(parameter.requires_grad for parameter in model.parameters())
