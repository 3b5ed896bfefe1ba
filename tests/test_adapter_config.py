"""An adapter's config (`MoELoraConfig`, adapter_config.json): the tasks it records (`task_info`: name, class names,
templates) are checked as a task's are, when recorded, made and read back; a bad value read from adapter_config.json
is named with the file by every loader (peft's, the library's, the classifier's, the pipeline's); a peft task type of
language models is refused on CLIP before anything is injected."""

import json
import re

import pytest

from hf_moe_cl import MoELoraConfig

from conftest import edited, load_peft, moe_model, saved, tiny_clip


def in_file(folder, message):
    return re.escape(str(folder / "adapter_config.json")) + " holds an invalid value: (.* )?" + message


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


# ----- task records --------------------------------------------------------------------------------------------------
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


@pytest.mark.parametrize("task_info", [
    "first", [{"name": 3, "classnames": ["a"], "templates": ["{}"]}], [{"name": "a", "classnames": "ab",
                                                                         "templates": ["{}"]}],
    [{"name": "a"}], [None, None, None], [["a", ["b"], ["{}"]]],
])
def test_a_task_info_of_the_wrong_type_or_length_is_named(tmp_path, task_info):
    from peft import PeftModel

    from hf_moe_cl import MoELoraConfig

    with pytest.raises(ValueError, match="`task_info` must be a list of at most num_tasks=2 entries"):
        MoELoraConfig(num_tasks=2, task_info=task_info)
    moe_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "task_info": task_info}))
    with pytest.raises(ValueError, match="`task_info` must be .* the file was damaged or edited"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


# ----- values of adapter_config.json through every loader ------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"expert_bias": "false"}, r"`expert_bias` must be a boolean \(True or False\), got 'false'"),
    ({"expert_activation": ["relu"]}, r"`expert_activation` must be None or a string, got \['relu'\]"),
    ({"selector": "x"}, r"`selector` must be None or a dict of DDAS selector settings"),
    ({"selector": {"hidden_dim": 8}}, r"the DDAS selector settings lack `feature_dim`"),
    ({"target_modules": 5}, r"`target_modules` must be None, a string or a list of strings"),
    ({"inference_mode": "no"}, r"`inference_mode` must be a boolean \(True or False\), got 'no'"),
    ({"base_model_name_or_path": 5}, r"`base_model_name_or_path` must be None or a string, got 5"),
    ({"task_type": "CLIP"}, r"Invalid task type: 'CLIP'"),
    ({"file_sha256": {}}, r"`file_sha256` \(\{\}\) records no sha256 of adapter_model.safetensors, the weights file "
                          r"loaded, so it checks nothing"),
    ({"hide_frozen_experts": True, "expert_growth_threshold": 0.25}, r"`expert_growth_threshold` \(0.25\) keeps 0.25 "
                                                                     r"x num_experts \(4\) experts trainable, fewer "
                                                                     r"than top_k \(2\).* at least top_k / num_experts "
                                                                     r"= 0.5, or hide_frozen_experts=False"),
])
@pytest.mark.parametrize("load", LOADERS)
def test_every_loader_names_the_adapter_config_holding_a_bad_value(adapter, tmp_path, config, message, load):
    folder = edited(adapter, tmp_path / "damaged", config=config)
    with pytest.raises(ValueError, match=in_file(folder, message)):
        load(folder)


@pytest.mark.parametrize("hide, threshold, accepted", [
    (True, 0.25, False), (True, 0.49, False), (True, 0.5, True), (True, None, True), (False, 0.25, True)])
def test_hiding_frozen_experts_needs_growth_to_keep_top_k_experts(hide, threshold, accepted):
    def make():
        return MoELoraConfig(num_experts=4, top_k=2, hide_frozen_experts=hide, expert_growth_threshold=threshold)

    if accepted:
        assert make().expert_growth_threshold == threshold
    else:
        with pytest.raises(ValueError, match=r"fewer than top_k \(2\).* at least top_k / num_experts = 0.5"):
            make()


def test_an_adapter_config_without_a_peft_type_is_named_by_the_librarys_loader(adapter, tmp_path):
    folder = edited(adapter, tmp_path / "damaged")
    values = json.loads((folder / "adapter_config.json").read_text())
    del values["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"The adapter_config.json of {re.escape(str(folder))} has no `peft_type`"):
        load_library(folder)


# ----- peft's task types ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_type", ["SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION"])
def test_a_language_task_type_on_clip_is_refused_before_injection(adapter, tmp_path, task_type):
    from peft import get_peft_model

    message = rf"`task_type` of adapter 'default' is '{task_type}', but peft's task types wrap language models"
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, top_k=2, r=4, task_type=task_type))
    with pytest.raises(ValueError, match=message):
        load_peft(edited(adapter, tmp_path / "damaged", config={"task_type": task_type}))
