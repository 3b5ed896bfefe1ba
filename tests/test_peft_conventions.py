"""peft's own tools on a MoE-LoRA model: status, parameter counts, adapters, targets and what is refused."""

import json

import pytest
import torch
from peft import PeftModel, get_layer_status, get_model_status, get_peft_model
from transformers import CLIPTextModel, CLIPVisionModel

from hf_moe_cl import MoELoraConfig

from conftest import moe_model, tiny_clip


def test_the_adapter_config_stores_the_plain_peft_type_and_model_status_reports_it(tmp_path):
    model = moe_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MOE_LORA"
    status = model.get_model_status()
    assert status.peft_types == {"default": "MOE_LORA"} and get_model_status(model).peft_types == status.peft_types
    assert (status.num_adapter_layers, status.trainable_params, status.enabled) == (4, 8384, True)
    layers = get_layer_status(model)
    assert [layer.name for layer in layers] == [f"model.{tower}_model.encoder.layers.{i}" for tower in ("text", "vision")
                                                for i in (0, 1)]
    assert {layer.module_type for layer in layers} == {"moe_lora.MoELoraBlock"}
    assert all(layer.requires_grad == {"default": True} for layer in layers)


def test_a_saved_adapter_card_says_how_to_load_and_names_no_local_path(tmp_path):
    model = moe_model()
    model.base_model.model.name_or_path = str(tmp_path / "my-local-clip")
    model.base_model.model.config._name_or_path = str(tmp_path / "my-local-clip")
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "import hf_moe_cl" in card and str(tmp_path) not in card
    assert "Provide a quick summary" not in card  # peft's template is replaced


def test_trainable_parameter_counts_leave_out_frozen_experts_and_routers(capsys):
    model = moe_model()  # 2 tasks, 4 experts of rank 4; blocks of width 48 (vision) and 32 (text), 2 of each
    assert model.get_nb_trainable_parameters()[0] == 8384
    moe = model.base_model
    for layer in moe.moe_layers().values():
        layer.freeze_experts("default", [0], 0)
        layer.freeze_router("default", 0)
    # per block: one expert (A, B, both biases) and task 0's gate and noise rows are no parameters any more
    frozen = 2 * (4 * 48 * 2 + 4 + 48 + 48 * 4 * 2) + 2 * (4 * 32 * 2 + 4 + 32 + 32 * 4 * 2)
    assert frozen == 2736
    trainable, total = model.get_nb_trainable_parameters()
    assert (trainable, total) == (8384 - 2736, 71489 - 2736)
    assert model.get_model_status().trainable_params == 5648
    model.print_trainable_parameters()
    assert "trainable params: 5,648 || all params: 68,753" in capsys.readouterr().out


def test_peft_loras_option_names_name_the_moe_lora_option():
    from hf_moe_cl import MoELoraConfig

    for given, named in ((dict(lora_alpha=16), "`lora_alpha` \\(peft LoRA's\\): use `expert_scale`"),
                         (dict(lora_dropout=0.1), "use `expert_dropout`"), (dict(bias="none"), "use `expert_bias`"),
                         (dict(layers_to_transform=[0]), "use `target_modules`"), (dict(use_dora=True), "has none")):
        with pytest.raises(ValueError, match=named):
            MoELoraConfig(**given)


def test_load_adapter_under_another_name_brings_its_ddas_selector(tmp_path):
    model = moe_model(init_weights=False)
    model.base_model.enable_selector({"feature_dim": 16})
    with torch.no_grad():
        model.base_model.selector.feature_mean.fill_(0.25)
    model.save_pretrained(tmp_path)
    other = moe_model()
    other.load_adapter(tmp_path, adapter_name="second")
    assert other.base_model.selector is None  # the active adapter is still the first one
    other.set_adapter("second")
    assert torch.equal(other.base_model.selector.feature_mean, torch.full((16,), 0.25))
    assert other.base_model.selector.num_tasks == 2
    other.set_adapter("default")
    other.delete_adapter("second")
    assert not any("second" in key for key in other.state_dict())  # the selector went with its adapter


@pytest.mark.parametrize("model_class", [CLIPVisionModel, CLIPTextModel])
def test_default_targets_of_a_single_clip_tower(model_class):
    config = tiny_clip().config
    tower = model_class(config.vision_config if model_class is CLIPVisionModel else config.text_config)
    model = get_peft_model(tower, MoELoraConfig(num_experts=2, top_k=1, r=2))
    assert sorted(model.base_model.moe_layers()) == ["encoder.layers.0", "encoder.layers.1"]


def test_add_weighted_adapter_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="add_weighted_adapter is not supported by MoE-LoRA, because its experts are "
                                         "chosen per sample by task routers"):
        moe_model().add_weighted_adapter(["default"], [1.0], "mixed")


def test_a_folder_saved_with_the_plain_type_loads_with_peft(tmp_path, clip_inputs):
    model = moe_model(init_weights=False).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path).eval()
    model.set_task(1), loaded.set_task(1)
    with torch.no_grad():
        assert torch.equal(loaded(**clip_inputs).logits_per_image, model(**clip_inputs).logits_per_image)


def test_the_peft_conformance_runner_adds_moe_lora_cases_to_peft_s_table():
    import peft_conformance

    source = 'X_TEST_CASES = [\n]\nTEST_CASES = [\n    ("Vanilla MLP 1 LoRA", "MLP", LoraConfig, {}),\n]\n'
    patched = peft_conformance.add_cases(source)
    namespace = {"LoraConfig": object}
    exec(patched.replace("import hf_moe_cl  # registers MoE-LoRA with peft\n", ""), namespace)
    names = [case[0] for case in namespace["TEST_CASES"]]
    assert names[:4] == [f"Vanilla MLP {i} MoE-LoRA" for i in range(1, 5)] and names[4] == "Vanilla MLP 1 LoRA"
    assert namespace["X_TEST_CASES"] == []
    for case in namespace["TEST_CASES"][:4]:
        case[2](**case[3])  # valid configs
    with pytest.raises(SystemExit, match="no single `TEST_CASES = \\[` table"):
        peft_conformance.add_cases("CASES = []\n")


def test_the_version_has_one_source():
    import tomllib
    from pathlib import Path

    import hf_moe_cl

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_moe_cl.__version__"}
    assert hf_moe_cl.__version__ == "0.3.0"


def test_peft_mixed_model_refuses_moe_lora_as_the_docs_say():
    """docs/peft_conventions.md: `get_peft_model(..., mixed=True)` is refused by peft (side by side: add_adapter)."""
    with pytest.raises(ValueError, match="'MOE_LORA' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2), mixed=True)
