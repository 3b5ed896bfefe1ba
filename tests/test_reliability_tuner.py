"""Bad values given to the MoE-LoRA tuner or read from a saved adapter (task records, DDAS selector, peft's own fields):
each is refused with a message naming the value, the fix and, when read from disk, the file; nothing is recorded,
written or loaded. The table of cases is docs/reliability.md."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_moe_cl import MoELoraConfig, SelectorConfig

from conftest import moe_model, tiny_clip


def saved(folder, model):
    model.save_pretrained(folder)
    return folder


def edited(source, folder, config=None, tensors=None):
    """A copy of the adapter folder `source` with `config` values and `tensors` (name suffix -> new value) replaced."""
    shutil.copytree(source, folder)
    if config is not None:
        values = json.loads((folder / "adapter_config.json").read_text())
        values.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(values))
    if tensors is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        for suffix, value in tensors.items():
            weights[next(k for k in weights if k.endswith(suffix))] = value
        save_file(weights, folder / "adapter_model.safetensors")
    return folder


def in_file(folder, message):
    return re.escape(str(folder / "adapter_config.json")) + " holds an invalid value: (.* )?" + message


def load_peft(folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_clip(), str(folder))


def load_library(folder):
    from hf_moe_cl.inference import load_adapter_model

    return load_adapter_model(str(folder))


def load_classifier(folder):
    from hf_moe_cl import TaskAgnosticClassifier

    return TaskAgnosticClassifier.from_pretrained(str(folder))


def load_pipeline_model(folder):
    from hf_moe_cl.pipeline import MoELoraCLIP

    return MoELoraCLIP.from_pretrained(str(folder))


LOADERS = [load_peft, load_library, load_classifier, load_pipeline_model]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return saved(tmp_path_factory.mktemp("adapter") / "good", moe_model())


# ----- task records ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task, name, classnames, templates, message", [
    (0, "x", "abc", ["{}"], r"Task 0 \('x'\) in `task_info`: `classnames` must be a list of class names .* one class "
                            r"per character"),
    (1, "x", ["a", "b"], "photo of {}", r"Task 1 \('x'\) in `task_info`: `templates` must be a non-empty list"),
    (1, 5, ["a"], ["{}"], r"Task 1's name in `task_info` must be a non-empty string, got 5"),
    (0, " ", ["a"], ["{}"], r"Task 0's name in `task_info` must be a non-empty string, got ' '"),
    (0, "x", ["a", "a"], ["{}"], r"Task 0 \('x'\) in `task_info` has duplicate class names \['a'\]"),
    (0, "x", ["a", ""], ["{}"], r"Task 0 \('x'\) in `task_info` needs one non-empty class name"),
    (0, "x", ["a"], ["photo"], r"the prompt template 'photo' has no '\{\}'"),
    (0, "x", ["a"], ["{} {}"], r"the prompt template '\{\} \{\}' has 2 fields"),
    (2, "x", ["a"], ["{}"], r"Task id 2 is out of range: this adapter has 2 task routers"),
    (True, "x", ["a"], ["{}"], r"A task id must be an integer, got the boolean True"),
])
def test_set_task_info_refuses_what_a_saved_adapter_could_not_load(task, name, classnames, templates, message):
    model = moe_model()
    with pytest.raises(ValueError, match=message):
        model.base_model.set_task_info(task, name, classnames, templates)
    assert model.base_model.task_info == [None, None]  # nothing recorded


def test_a_recorded_task_saves_and_loads_again(tmp_path):
    model = moe_model()
    model.base_model.set_task_info(1, "colours", ("red", "green"), ["a photo of {}.", "{{x}} {}"])
    loaded = load_peft(saved(tmp_path / "adapter", model))
    assert loaded.base_model.task_info == [None, {"name": "colours", "classnames": ["red", "green"],
                                                  "templates": ["a photo of {}.", "{{x}} {}"]}]


@pytest.mark.parametrize("entry, message", [
    ({"templates": ["photo"]}, r"Task 0 \('first'\) in `task_info`: the prompt template 'photo' has no '\{\}'"),
    ({"templates": ["{} {}"]}, r"the prompt template '\{\} \{\}' has 2 fields"),
    ({"templates": ["{0}"]}, r"the prompt template '\{0\}' has the field \{0\}"),
    ({"classnames": ["red", "red"]}, r"Task 0 \('first'\) in `task_info` has duplicate class names \['red'\]"),
    ({"classnames": []}, r"Task 0 \('first'\) in `task_info` has no class names"),
    ({"templates": []}, r"`templates` must be a non-empty list of prompt templates, got \[\]"),
    ({"name": ""}, r"Task 0's name in `task_info` must be a non-empty string, got ''"),
])
@pytest.mark.parametrize("load", LOADERS)
def test_a_saved_task_record_is_checked_like_a_task_naming_the_file(adapter, tmp_path, entry, message, load):
    record = {"name": "first", "classnames": ["red", "green"], "templates": ["a photo of {}."], **entry}
    with pytest.raises(ValueError, match=message):
        MoELoraConfig(num_tasks=2, task_info=[record])
    folder = edited(adapter, tmp_path / "damaged", config={"task_info": [record, None]})
    with pytest.raises(ValueError, match=in_file(folder, message)):
        load(folder)


# ----- values of adapter_config.json through every loader ----------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"expert_bias": "false"}, r"`expert_bias` must be a boolean \(True or False\), got 'false'"),
    ({"expert_activation": ["relu"]}, r"`expert_activation` must be None or a string, got \['relu'\]"),
    ({"selector": "x"}, r"`selector` must be None or a dict of DDAS selector settings"),
    ({"selector": {"hidden_dim": 8}}, r"the DDAS selector settings lack `feature_dim`"),
    ({"target_modules": 5}, r"`target_modules` must be None, a string or a list of strings"),
    ({"inference_mode": "no"}, r"`inference_mode` must be a boolean \(True or False\), got 'no'"),
    ({"base_model_name_or_path": 5}, r"`base_model_name_or_path` must be None or a string, got 5"),
    ({"task_type": "CLIP"}, r"Invalid task type: 'CLIP'"),
])
@pytest.mark.parametrize("load", LOADERS)
def test_every_loader_names_the_adapter_config_holding_a_bad_value(adapter, tmp_path, config, message, load):
    folder = edited(adapter, tmp_path / "damaged", config=config)
    with pytest.raises(ValueError, match=in_file(folder, message)):
        load(folder)


def test_an_adapter_config_without_a_peft_type_is_named_by_the_librarys_loader(adapter, tmp_path):
    folder = edited(adapter, tmp_path / "damaged")
    values = json.loads((folder / "adapter_config.json").read_text())
    del values["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"The adapter_config.json of {re.escape(str(folder))} has no `peft_type`"):
        load_library(folder)


def test_the_pipeline_loader_passes_the_subfolder_on(tmp_path):
    """`MoELoraCLIP.from_pretrained(root, subfolder=...)` loads the adapter of the subfolder (it used to be dropped
    after the source check, so the root was read instead)."""
    tiny_clip().save_pretrained(tmp_path / "base")
    model = moe_model()
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    saved(tmp_path / "root" / "adapter", model)
    from hf_moe_cl.pipeline import MoELoraCLIP

    loaded = MoELoraCLIP.from_pretrained(str(tmp_path / "root"), subfolder="adapter")
    assert loaded.peft_config["default"].num_tasks == 2


# ----- peft's own fields ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"inference_mode": "false"}, r"`inference_mode` must be a boolean \(True or False\), got 'false'"),
    ({"inference_mode": 0}, r"`inference_mode` must be a boolean \(True or False\), got 0"),
    ({"revision": 1}, r"`revision` must be None or a string, got 1"),
    ({"auto_mapping": "x"}, r"`auto_mapping` must be None or a dict, got 'x'"),
    ({"modules_to_save": "proj"}, r"`modules_to_save` must be None or a list of module names, got 'proj': write "
                                  r"\['proj'\]"),
    ({"modules_to_save": [1]}, r"`modules_to_save` must be None or a list of module names, got \[1\]"),
    ({"target_modules": []}, r"`target_modules` is empty \(\[\]\), which adapts nothing"),
    ({"target_modules": ""}, r"`target_modules` is empty \(''\), which adapts nothing"),
    ({"task_type": "CLIP"}, r"Invalid task type: 'CLIP'"),
])
def test_pefts_own_fields_are_checked_when_the_config_is_made(values, message):
    with pytest.raises(ValueError, match=message):
        MoELoraConfig(num_tasks=2, num_experts=4, top_k=2, r=4, **values)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION"])
def test_a_language_task_type_on_clip_is_refused_before_injection(adapter, tmp_path, task_type):
    from peft import get_peft_model

    message = rf"`task_type` of adapter 'default' is '{task_type}', but peft's task types wrap language models"
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, top_k=2, r=4, task_type=task_type))
    with pytest.raises(ValueError, match=message):
        load_peft(edited(adapter, tmp_path / "damaged", config={"task_type": task_type}))


# ----- the DDAS selector ---------------------------------------------------------------------------------------------
def with_selector(**settings):
    model = moe_model()
    selector = model.base_model.enable_selector(SelectorConfig(**{"feature_dim": 16, "hidden_dim": 4, **settings}))
    generator = torch.Generator().manual_seed(0)
    selector.fit_reference(torch.randn(20, 16, generator=generator), steps=2)
    selector.fit_task(0, torch.randn(20, 16, generator=generator) + 3, steps=2, threshold=1.0)
    return model


@pytest.fixture(scope="module")
def selector_adapter(tmp_path_factory):
    return saved(tmp_path_factory.mktemp("selector") / "good", with_selector())


def test_an_intact_selector_loads(selector_adapter):
    selector = load_peft(selector_adapter).base_model.selector
    assert selector.thresholds.tolist() == [1.0, float("inf")] and selector.trained.tolist() == [True, True, False]


@pytest.mark.parametrize("tensors, message", [
    ({"thresholds": torch.tensor([-1.0, float("inf")])}, r"thresholds \[-1.0, inf\] \(each must be positive"),
    ({"thresholds": torch.tensor([0.0, float("inf")])}, r"thresholds \[0.0, inf\] \(each must be positive"),
    ({"thresholds": torch.tensor([1, 2])}, r"`thresholds` of dtype torch.int64 \(floating point\)"),
    ({"trained": torch.tensor([0.5, 0.5, 0.0])}, r"`trained` of dtype torch.float32 \(it holds booleans"),
    ({"feature_mean": torch.full((16,), float("nan"))}, r"non-finite values in `feature_mean`"),
])
def test_impossible_values_of_a_saved_selector_are_refused_at_load(selector_adapter, tmp_path, tensors, message):
    folder = edited(selector_adapter, tmp_path / "damaged", tensors=tensors)
    with pytest.raises(ValueError, match=r"The DDAS selector of adapter 'default' in its weights "
                                         r"\(adapter_model.safetensors\) has " + message + ".*damaged or edited"):
        load_peft(folder)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan")])
def test_fit_task_refuses_a_threshold_that_routes_nothing_before_training(threshold):
    selector = with_selector().base_model.selector
    before = selector.decoder_weight.clone()
    with pytest.raises(ValueError, match=f"A task autoencoder needs a positive threshold, got {threshold}"):
        selector.fit_task(1, torch.randn(20, 16), steps=2, threshold=threshold)
    assert not selector.task_is_trained(1) and torch.equal(selector.decoder_weight, before)


def test_a_feature_layer_beyond_the_vision_tower_is_refused(selector_adapter, tmp_path):
    model = moe_model()
    with pytest.raises(ValueError, match=r"The DDAS selector of adapter 'default' reads the tokens after "
                                         r"`feature_layer`=3 vision blocks, but this model's vision tower has 2: give "
                                         r"1 to 2"):
        model.base_model.enable_selector({"feature_dim": 96, "feature_layer": 3})
    assert model.base_model.selector is None and model.peft_config["default"].selector is None  # nothing enabled
    model.base_model.enable_selector({"feature_dim": 96, "feature_layer": 2})  # the last block is fine
    folder = edited(selector_adapter, tmp_path / "damaged",
                    config={"selector": {"feature_dim": 16, "hidden_dim": 4, "feature_layer": 7}})
    with pytest.raises(ValueError, match=r"`feature_layer`=7 vision blocks, but this model's vision tower has 2.*"
                                         r"damaged or edited"):
        load_peft(folder)


def test_features_of_another_width_than_the_selectors_are_named(selector_adapter, tmp_path, clip_inputs):
    """A saved `feature_layer` edited to a valid depth but another width than `feature_dim` is refused at load,
    naming both widths (it used to fail only when features reached the selector); features of another width given
    to a selector directly name the widths too, instead of torch's size mismatch."""
    folder = edited(selector_adapter, tmp_path / "edited",
                    config={"selector": {"feature_dim": 16, "hidden_dim": 4, "feature_layer": 1}})
    with pytest.raises(ValueError, match=r"reads 16 features per image, but this model gives 96 \(its tokens after 1 "
                                         r"vision blocks\).*damaged or edited"):
        load_peft(folder)
    with pytest.raises(ValueError, match=r"reads 16 features per image \(CLIP's image embeddings\), got features of "
                                         r"shape \(3, 8\)"):
        with_selector().base_model.selector.select(torch.randn(3, 8))


@pytest.mark.parametrize("settings, message", [
    ({"feature_dim": 43264, "feature_extractor": "alexnet", "feature_layer": 2},
     "`selector.feature_layer` selects CLIP vision blocks; it cannot be used with the AlexNet extractor"),
    ({"feature_dim": 512, "feature_extractor": "alexnet"},
     "`selector.feature_dim` must be 43264 with the AlexNet extractor"),
])
def test_alexnet_selector_settings_that_cannot_fit_its_features_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SelectorConfig(**settings)
