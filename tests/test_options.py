"""Option values are checked when the options are made: a wrong type, NaN, infinity or a value out of range is
refused with a message that names the option, the value and the valid range (`hf_moe_cl.options.check_option`), before
any work: the adapter's config, the methods' and DDAS' arguments, the training arguments."""

import math
import re

import pytest
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from hf_moe_cl import MoELoraConfig, SelectorConfig
from hf_moe_cl.continual.methods import ConDUArguments, MoEAdaptersArguments

from conftest import continual_args


@pytest.mark.parametrize("make, message", [
    (lambda: MoELoraConfig(noise_epsilon=math.nan), "`noise_epsilon` must be a finite number"),
    (lambda: MoELoraConfig(load_balancing_coef=math.nan), "`load_balancing_coef` must be a finite number"),
    (lambda: MoELoraConfig(expert_scale=math.inf), "`expert_scale` must be a finite number"),
    (lambda: MoELoraConfig(expert_scale=0.0), "`expert_scale` must be a finite number > 0, got 0.0"),
    (lambda: MoELoraConfig(expert_scale=-0.1), "`expert_scale` must be a finite number > 0, got -0.1"),
    (lambda: continual_args("/tmp/x", remove_unused_columns=True),
     "`remove_unused_columns=True` cannot be used with ContinualTrainer: the collator reads the `image` and `label` "
     "columns"),
    (lambda: MoELoraConfig(expert_dropout=math.nan), "`expert_dropout` must be a finite number"),
    (lambda: MoELoraConfig(noise_epsilon=-1.0), "`noise_epsilon` must be a finite number >= 0, got -1.0"),
    (lambda: continual_args("/tmp/x", learning_rate=math.inf), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", learning_rate=0.0), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", learning_rate=-1e-3), "`learning_rate` must be a finite number > 0"),
    (lambda: continual_args("/tmp/x", task_learning_rates=[1e-3, math.nan]), r"`task_learning_rates\[1\]`"),
    (lambda: continual_args("/tmp/x", max_steps=-2), "`max_steps` must be the steps per task"),
    (lambda: continual_args("/tmp/x", max_steps=-1, num_train_epochs=0), "set it above 0"),
    (lambda: continual_args("/tmp/x", train_augmentation="flip"), "`train_augmentation` must be None or one of"),
    (lambda: MoEAdaptersArguments(merge_experts_every=-1), "`merge_experts_every` must be an integer >= 0, got -1"),
    (lambda: SelectorConfig(feature_dim=0), "`selector.feature_dim` must be None or an integer >= 1, got 0"),
    (lambda: SelectorConfig(feature_dim=8, feature_layer=0), "`selector.feature_layer` must be None or an integer >= 1"),
    (lambda: ConDUArguments(condu_top_k=0), "`condu_top_k` must be an integer >= 1, got 0"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def option_classes():
    from hf_moe_cl import MoELoraConfig, SelectorConfig
    from hf_moe_cl.continual.methods import ConDUArguments, DDASArguments, LoRAArguments, MoEAdaptersArguments
    from hf_moe_cl.experiments.experiment import AdapterArguments, MethodArguments

    return {"moe": MoEAdaptersArguments, "ddas": DDASArguments, "condu": ConDUArguments, "lora": LoRAArguments,
            "adapter": AdapterArguments,
            "method": MethodArguments, "config": MoELoraConfig,
            "selector": lambda **kw: SelectorConfig(feature_dim=8, **kw),
            "training": lambda **kw: continual_args("/tmp/unused", **kw)}


@pytest.mark.parametrize("kind, option, value, message", [
    ("adapter", "top_k", 30, r"`top_k` \(30\) cannot exceed `num_experts` \(22\)"),
    ("adapter", "num_experts", 0, "`num_experts` must be an integer >= 1, got 0"),
    ("adapter", "noisy_gating", "false", r"`noisy_gating` must be a boolean \(True or False\), got 'false'"),
    ("adapter", "ddas_feature_layer", 0, "`selector.feature_layer` must be None or an integer >= 1"),
    ("adapter", "ddas_feature_extractor", "vgg", r"`selector.feature_extractor` must be one of \('clip', 'alexnet'\)"),
    ("moe", "freeze_experts_per_task", -1, "`freeze_experts_per_task` must be None or an integer >= 0"),
    ("moe", "freeze_images", 0, "`freeze_images` must be None or an integer >= 1"),
    ("moe", "routing_report_images", 2.5, "`routing_report_images` must be an integer"),
    ("moe", "merge_experts_every", math.nan, "`merge_experts_every` must be an integer"),
    ("moe", "shared_router", 1, "`shared_router` must be a boolean"),
    ("ddas", "ddas", "yes", "`ddas` must be a boolean"),
    ("ddas", "ddas_alexnet_weights", 5, "`ddas_alexnet_weights` must be None or a string"),
    ("ddas", "ddas_batch_size", 0, "`ddas_batch_size` must be an integer >= 1"),
    ("condu", "condu_lora_init_std", math.nan, r"`condu_lora_init_std` must be a finite number in \(0, 1\]"),
    ("condu", "condu_lora_init_std", 1e39, r"`condu_lora_init_std` must be a finite number in \(0, 1\], got 1e\+39"),
    ("condu", "condu_lora_init_std", 2.0, r"`condu_lora_init_std` must be a finite number in \(0, 1\], got 2.0"),
    ("condu", "condu_top_k", 1.5, "`condu_top_k` must be an integer"),
    ("lora", "lora_targets", " , ", "lora_targets names no module"),
    ("method", "rank", 0, "`rank` must be an integer >= 1, got 0"),
    ("method", "method", ["lora"], r"`method` must be a string, got \['lora'\]"),
    ("method", "use_task_learning_rates", "false", "`use_task_learning_rates` must be a boolean"),
    ("config", "expert_bias", "false", "`expert_bias` must be a boolean"),
    ("config", "init_weights", 1, "`init_weights` must be a boolean"),
    ("config", "expert_growth_threshold", True, "`expert_growth_threshold` must be None or a finite number"),
    ("config", "target_modules", 5, "`target_modules` must be None, a string or a list of strings"),
    ("config", "experts_per_module", [1], "`experts_per_module` must be a dict"),
    ("selector", "standardize", "no", "`selector.standardize` must be None or a boolean"),
    ("training", "per_device_train_batch_size", 0, "`per_device_train_batch_size` must be an integer >= 1"),
    ("training", "gradient_accumulation_steps", 0, "`gradient_accumulation_steps` must be an integer >= 1"),
    ("training", "label_smoothing_factor", 1.5, r"`label_smoothing_factor` must be a finite number in \[0, 1\)"),
    ("training", "weight_decay", math.nan, "`weight_decay` must be a finite number >= 0"),
    ("training", "max_grad_norm", -1.0, "`max_grad_norm` must be None or a finite number >= 0"),
    ("training", "adam_beta2", 1.0, r"`adam_beta2` must be a finite number in \[0, 1\)"),
    ("training", "seed", -1, r"`seed` must be an integer in \[0, 4294967295\]"),
    ("training", "save_total_limit", 0, "`save_total_limit` must be None or an integer >= 1"),
    ("training", "task_learning_rates", 1e-3, "`task_learning_rates` must be None or a list"),
    ("training", "train_template", -1, "`train_template` must be an integer >= 0"),
    ("training", "max_steps", 1.5, "`max_steps` must be an integer"),
    ("training", "num_train_epochs", math.nan, "`num_train_epochs` must be a finite number >= 0"),
    ("training", "check_images", "no", "`check_images` must be a boolean"),
])
def test_every_option_refuses_a_wrong_type_or_range_when_made(kind, option, value, message):
    with pytest.raises(ValueError, match=message):
        option_classes()[kind](**{option: value})


# ----- DDAS options --------------------------------------------------------------------------------------------------
def test_a_zero_ddas_threshold_is_refused_when_the_options_are_made():
    from hf_moe_cl.continual.methods import DDASArguments

    with pytest.raises(ValueError, match=r"`ddas_threshold` must be None or a finite number > 0, got 0.0"):
        DDASArguments(ddas=True, ddas_threshold=0.0)
    assert DDASArguments(ddas=True, ddas_threshold=1e-6).ddas_threshold == 1e-6


@pytest.mark.parametrize("option, value, message", [
    ("ddas_quantile", 2.0, r"`ddas_quantile` must be a finite number in \(0, 1\], got 2.0"),
    ("ddas_quantile", 0.0, "`ddas_quantile` must be a finite number in"),
    ("ddas_quantile", math.nan, "`ddas_quantile` must be a finite number in"),
    ("ddas_learning_rate", -1e-3, "`ddas_learning_rate` must be a finite number > 0"),
    ("ddas_learning_rate", math.inf, "`ddas_learning_rate` must be a finite number > 0"),
    ("ddas_threshold", math.nan, "`ddas_threshold` must be None or a finite number > 0, got nan"),
    ("ddas_threshold", -0.1, "`ddas_threshold` must be None or a finite number > 0"),
    ("ddas_threshold", 0.0, "`ddas_threshold` must be None or a finite number > 0, got 0.0"),
    ("ddas_threshold", "0.06", "`ddas_threshold` must be None or a finite number"),
    ("ddas_max_images", 0, "`ddas_max_images` must be an integer >= 1, got 0"),
    ("ddas_hidden_dim", 0, "`selector.hidden_dim` must be an integer >= 1"),  # deprecated: SelectorConfig's
    ("ddas_task_steps", 0, "`ddas_task_steps` must be an integer >= 1"),
    ("ddas_reference_steps", 1.5, "`ddas_reference_steps` must be an integer >= 1"),
    ("ddas_max_images", True, "`ddas_max_images` must be an integer"),
])
def test_ddas_options_out_of_range_are_refused(option, value, message):
    from hf_moe_cl.continual.methods import DDASArguments

    with pytest.raises(ValueError, match=message):
        DDASArguments(ddas=True, **{option: value})


@pytest.mark.parametrize("settings, message", [
    ({"feature_dim": 43264, "feature_extractor": "alexnet", "feature_layer": 2},
     "`selector.feature_layer` selects CLIP vision blocks; it cannot be used with the AlexNet extractor"),
    ({"feature_dim": 512, "feature_extractor": "alexnet"},
     "`selector.feature_dim` must be 43264 with the AlexNet extractor"),
])
def test_alexnet_selector_settings_that_cannot_fit_its_features_are_refused(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SelectorConfig(**settings)


# ----- peft's own fields of the adapter's config ---------------------------------------------------------------------
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


# ----- Trainer options the task loop does itself ---------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (dict(save_strategy="steps", save_steps=1), r"`save_strategy='steps'` cannot be used with ContinualTrainer: the "
     r"Trainer's checkpoint-N folders count the steps from 0 in every task.*\(save_task_checkpoints\)\. Leave "
     r"`save_strategy` at 'no'"),
    (dict(save_strategy="epoch"), r"`save_strategy='epoch'` cannot be used"),
    (dict(save_strategy=SaveStrategy.BEST), r"`save_strategy=<SaveStrategy.BEST: 'best'>` cannot be used"),
    (dict(eval_strategy="steps", eval_steps=1), r"`eval_strategy='steps'` cannot be used with ContinualTrainer: the "
     r"Trainer has no eval_dataset; .*call trainer.evaluate\(\) from a callback\. Leave `eval_strategy` at 'no'"),
    (dict(eval_strategy="epoch"), r"`eval_strategy='epoch'` cannot be used"),
    (dict(load_best_model_at_end=True), r"`load_best_model_at_end=True` cannot be used with ContinualTrainer: every "
     r"task keeps its own checkpoint"),
])
def test_trainer_saves_and_evaluations_inside_a_task_are_refused_when_the_arguments_are_made(tmp_path, overrides,
                                                                                              message):
    with pytest.raises(ValueError, match=message):
        continual_args(tmp_path / "run", **overrides)
    assert not (tmp_path / "run").exists()


def test_the_task_loops_own_strategies_are_accepted(tmp_path):
    args = continual_args(tmp_path, save_strategy=SaveStrategy.NO, eval_strategy=IntervalStrategy.NO, save_steps=1)
    assert args.save_strategy == "no" and args.eval_strategy == "no"


def test_epochs_that_max_steps_leaves_unused_are_named(tmp_path, caplog):
    """A Trainer user setting epochs alone got 1000 steps per task (the paper's max_steps) without a word."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        continual_args(tmp_path, num_train_epochs=1, max_steps=1000, warmup_steps=100)
    assert "num_train_epochs=1 is not used: max_steps=1000 sets the steps of every task. Set max_steps=-1" in \
        caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_moe_cl"):
        continual_args(tmp_path, num_train_epochs=1, max_steps=-1)
        continual_args(tmp_path, max_steps=1000, warmup_steps=100)
    assert "num_train_epochs" not in caplog.text
