"""Official recipe details outside DDAS: CIL noise at evaluation, ConDU's few-shot rates, the global batch."""

import pytest
import torch

from hf_moe_cl.experiments.recipes import preset_recipe
from hf_moe_cl.experiments.experiment import AdapterArguments

from conftest import moe_model


def test_noisy_gating_eval_keeps_the_router_noise_on_in_evaluation(clip_inputs):
    outputs = {}
    for keep in (False, True):
        model = moe_model(noisy_gating_eval=keep).eval()
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "moe_lora" in name:  # trained-looking experts and routers, and a large learned noise scale
                torch.nn.init.constant_(param, 3.0) if "router_noise" in name else torch.nn.init.normal_(param)
        model.base_model.set_task(0)
        with torch.no_grad():
            outputs[keep] = [model(**clip_inputs).logits_per_image for _ in range(2)]
    assert torch.equal(*outputs[False])
    assert not torch.allclose(*outputs[True])


def test_class_incremental_presets_keep_the_noise_on_in_evaluation():
    for name in ("cifar100-cil-10", "cifar100-cil-20", "cifar100-cil-50"):
        assert preset_recipe(name)[AdapterArguments]["noisy_gating_eval"] is True


def test_condu_first_cell_is_the_pretrained_model_as_the_official_evaluation(tmp_path, module_processor):
    """ConDU evaluation.py lines 101 and 128: session 0 loads no task model, so (0, 0) is the pretrained model's."""
    from hf_moe_cl.continual import ContinualTrainer
    from hf_moe_cl.continual.methods import ConDU, ConDUArguments

    from conftest import colour_task, continual_args, tiny_clip

    results = {}
    for first_cell in ("task", "pretrained"):
        method = ConDU(tiny_clip(), ConDUArguments(condu_first_cell=first_cell, condu_prototype_images="plain"), rank=4)
        args = continual_args(tmp_path / first_cell, max_steps=3, learning_rate=5e-2, seed=5)
        trainer = ContinualTrainer(method=method, args=args, processing_class=module_processor)
        task = colour_task("first", seed=0)
        zero_shot = trainer.engine.pretrained_accuracies([task], trainer.classifier())
        results[first_cell] = (trainer.train_tasks([task]).accuracy_matrix[0][0], zero_shot)
    assert results["pretrained"][1] == {0: results["pretrained"][0]}  # the cell is the pretrained accuracy
    assert results["task"][1] == {}  # the task's own model: the pretrained one is not even measured
    assert ConDU(tiny_clip(), ConDUArguments(condu_first_cell="pretrained"), rank=4).cell_route(1, 0) == 0


def test_condu_prototypes_average_the_whole_augmented_training_set(tmp_path, module_processor, monkeypatch):
    """few_shot_finetune.py lines 181-197: prototypes over `dataset.train_loader` (train_preprocess, every image)."""
    from hf_moe_cl.continual import ContinualTrainer
    from hf_moe_cl.continual.preprocessing import RandomResizedCrop
    from hf_moe_cl.continual.methods import ConDU, ConDUArguments
    from hf_moe_cl.data.splits import few_shot_subset

    from conftest import colour_task, continual_args, tiny_clip

    task = colour_task("first", seed=0)
    task.full_train_dataset, task.train_dataset = task.train_dataset, few_shot_subset(task.train_dataset, 1, 42)
    method = ConDU(tiny_clip(), ConDUArguments(), rank=4)
    trainer = ContinualTrainer(method=method, args=continual_args(tmp_path, max_steps=1), processing_class=module_processor)
    loader = method._prototype_loader(trainer.task_context(), task)
    assert len(loader.dataset) == len(task.full_train_dataset) > len(task.train_dataset)
    assert isinstance(loader.collate_fn.augment, RandomResizedCrop)
    plain = ConDU(tiny_clip(), ConDUArguments(condu_prototype_images="plain"), rank=4)._prototype_loader(
        trainer.task_context(), task)
    assert len(plain.dataset) == len(task.train_dataset) and plain.collate_fn.augment is None


def test_presets_keep_the_official_global_batch_over_several_processes():
    from hf_moe_cl.experiments.recipes import per_device_batch

    assert [per_device_batch(64, n) for n in (1, 2, 4, 8)] == [64, 32, 16, 8]
    assert per_device_batch(128, 4) == 32
    import pytest

    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        per_device_batch(64, 3)


def test_apply_recipe_splits_the_batch_over_the_world_size_unless_the_user_set_it(tmp_path, monkeypatch):
    from hf_moe_cl.experiments.recipes import apply_recipe
    from hf_moe_cl.continual import ContinualTrainingArguments

    monkeypatch.setattr(ContinualTrainingArguments, "world_size", property(lambda self: 4))
    monkeypatch.setattr(ContinualTrainingArguments, "_check_launch", lambda self: None)  # no launcher announced 4
    training = ContinualTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    (resolved,) = apply_recipe("mtil-order-1", [training], explicit=set())
    assert resolved.per_device_train_batch_size == 16
    training = ContinualTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                          per_device_train_batch_size=64)
    (resolved,) = apply_recipe("mtil-order-1", [training], explicit={"per_device_train_batch_size"})
    assert resolved.per_device_train_batch_size == 64  # the user's own choice: 64 per device, 256 in all


def test_print_recipe_prints_every_resolved_argument_as_json(capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import mtil

    mtil.main(["--preset", "fewshot-mtil-order-1", "--print_recipe", "--ddas_threshold", "0.0585"])
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["ddas_threshold"] == 0.0585  # yours wins
    assert (resolved["ddas_learning_rate"], resolved["ddas_reference_shots"], resolved["max_steps"]) == (0.003, 5, 500)
    assert resolved["per_device_train_batch_size"] == 64
    assert {"learning_rate", "num_experts", "method", "preset"} <= set(resolved)
    assert "condu_first_cell" not in resolved  # a ConDU option: a MoE-Adapters run does not use it
    mtil.main(["--preset", "fewshot-mtil-order-1", "--method", "condu", "--print_recipe"])
    resolved = json.loads(capsys.readouterr().out)
    assert (resolved["condu_first_cell"], resolved["method"]) == ("pretrained", "condu")


def test_result_metrics_come_from_the_protocol_matrix_when_the_run_has_one():
    from hf_moe_cl.experiments.metrics import mtil_metrics
    from hf_moe_cl.continual.result import ContinualResult

    oracle = [[80.0, 10.0], [70.0, 90.0]]
    protocol = [[60.0, 20.0], [50.0, 40.0]]
    with_protocol = ContinualResult(["a", "b"], {"oracle": oracle, "protocol": protocol})
    assert with_protocol.headline == "protocol" and with_protocol.metrics == mtil_metrics(protocol)
    without = ContinualResult(["a", "b"], {"oracle": oracle})
    assert without.headline == "oracle" and without.metrics == mtil_metrics(oracle)


def test_official_cil_eval_crops_test_images_and_encodes_the_prompts_per_64_images(tmp_path, module_processor,
                                                                                  monkeypatch):
    """cil/main.py line 55, cil/continual_clip/models.py lines 29 and 36-40: test batches of 64 through the training
    transform, each encoding the class prompts again (so a noisy router draws new noise); the CIL presets do so."""
    import hf_moe_cl.classification as classification
    from hf_moe_cl import ContinualTrainer

    from conftest import colour_task, continual_args

    encodings, real = [], classification.text_embeddings
    monkeypatch.setattr(classification, "text_embeddings", lambda *a, **k: encodings.append(1) or real(*a, **k))
    task, seen = colour_task("first", n_eval=130), {}
    for official in (False, True):
        args = continual_args(tmp_path / str(official), official_cil_eval=official, per_device_eval_batch_size=32)
        trainer = ContinualTrainer(model=moe_model(noisy_gating_eval=True), args=args, processing_class=module_processor)
        trainer.num_routes = 1
        encodings.clear()
        for _ in range(2):
            trainer.evaluate_task(task, route=0)
        example = task.eval_dataset[0]
        pixels = [trainer.evaluation_collator([example])["pixel_values"] for _ in range(2)]
        seen[official] = len(encodings), torch.equal(*pixels)
    assert seen[False] == (2, True)  # the prompts once per evaluation; test images as evaluated, no crop
    assert seen[True] == (2 * 3, False)  # 130 images: 3 batches of 64 per evaluation; a new crop every time
    from hf_moe_cl.continual import ContinualTrainingArguments
    for name in ("cifar100-cil-10", "cifar100-cil-20", "cifar100-cil-50"):
        assert preset_recipe(name)[ContinualTrainingArguments]["official_cil_eval"] is True
    assert "official_cil_eval" not in preset_recipe("mtil-order-1")[ContinualTrainingArguments]


def test_condu_few_shot_augments_each_image_once_then_trains_on_it_fixed(tmp_path, module_processor, monkeypatch):
    """few_shot_finetune.py lines 39-58: the few-shot images are stacked once, augmented, into a TensorDataset that
    every step then draws from; 'every_step' augments each batch anew (as full-shot training does)."""
    from hf_moe_cl.continual import ContinualTrainer
    from hf_moe_cl.continual.preprocessing import RandomResizedCrop
    from hf_moe_cl.continual.methods import ConDU, ConDUArguments
    from hf_moe_cl.data.splits import few_shot_subset

    from conftest import colour_task, continual_args, tiny_clip

    crops, real = [], RandomResizedCrop.__call__
    monkeypatch.setattr(RandomResizedCrop, "__call__", lambda self, image: crops.append(1) or real(self, image))
    counted = {}
    for augment in ("once", "every_step"):
        task = colour_task("first", seed=0)
        task.full_train_dataset, task.train_dataset = task.train_dataset, few_shot_subset(task.train_dataset, 1, 42)
        method = ConDU(tiny_clip(), ConDUArguments(condu_few_shot_augment=augment, condu_prototype_images="plain"),
                       rank=4)
        args = continual_args(tmp_path / augment, max_steps=4, per_device_train_batch_size=8)
        trainer = ContinualTrainer(method=method, args=args, processing_class=module_processor)
        crops.clear()
        trainer.train_tasks([task])
        counted[augment] = len(crops)
    assert counted == {"once": 3, "every_step": 4 * 3}  # 3 images (1 shot x 3 classes), 4 steps of all 3
    with pytest.raises(ValueError, match="condu_few_shot_augment"):
        ConDUArguments(condu_few_shot_augment="twice")


def test_mini_presets_train_ddas_with_the_sampled_loop_and_the_paper_presets_with_the_official_one():
    """README: on CLIP embeddings (mini, mini-long) the `sampled` loop, its task autoencoders given the reference's
    1,000 steps; the paper's presets keep the official loop on AlexNet features."""
    from hf_moe_cl.continual.methods import DDASArguments

    for name in ("mini", "mini-long"):
        assert preset_recipe(name)[DDASArguments] == {"ddas": False, "ddas_training": "sampled",
                                                       "ddas_task_steps": 1000}
    for name in ("mtil-order-1", "fewshot-mtil-order-2"):
        recipe = preset_recipe(name)
        assert recipe[DDASArguments]["ddas_training"] == "official"
        assert recipe[AdapterArguments]["ddas_feature_extractor"] == "alexnet"
