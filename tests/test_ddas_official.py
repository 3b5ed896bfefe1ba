"""DDAS as the official code: the autoencoder training loop, the untrained-autoencoder rule, the presets' values."""

import math

import pytest
import torch
from peft import get_peft_model

from hf_moe_cl import MoELoraConfig, SelectorConfig
from hf_moe_cl.experiments.experiment import AdapterArguments
from hf_moe_cl.experiments.recipes import preset_recipe
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters
from hf_moe_cl.ddas import DistributionSelector
from hf_moe_cl.ddas.autoencoder import FeatureAutoencoder, epoch_batches, official_learning_rate, train_autoencoder

from conftest import colour_task, noise_images, tiny_clip


def test_the_official_loop_runs_iterations_plus_one_steps_restarting_the_loader_as_the_official_code():
    """AutoEncoder.py 167-175: iter() at every epoch boundary (iteration % num_batches == 0) and on StopIteration;
    few_shot_AutoEncoder.py counts epochs over the whole set (num_batches 5) while its loader holds 3 batches."""
    seen = []

    class Loader:
        def __iter__(self):
            for i in range(3):
                seen.append(i)
                yield torch.sigmoid(torch.full((2, 4), float(i)))

    autoencoder = FeatureAutoencoder(4, 2, sigmoid_output=True)
    steps = []
    autoencoder.register_forward_hook(lambda *_: steps.append(1))
    train_autoencoder(autoencoder, epoch_batches(Loader(), 5), 12, lr=0.01, weight_decay=1e-4, schedule="official",
                      batches_per_epoch=5)
    assert len(steps) == 13
    # iterations 0-2 batches 0,1,2; 3 runs out -> restart 0; 4 -> 1; 5 is an epoch boundary -> restart 0; ...
    assert seen == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 0, 1, 2]
    assert [official_learning_rate(0.01, i, 16) for i in (0, 159, 160, 319, 320)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001])


def test_the_official_optimiser_is_adam_with_weight_decay_and_the_decayed_rate(monkeypatch):
    made = []
    original = torch.optim.Adam

    def recording(params, **kwargs):
        made.append(original(params, **kwargs))
        return made[-1]

    monkeypatch.setattr(torch.optim, "Adam", recording)
    loader = [torch.rand(2, 4)]
    train_autoencoder(FeatureAutoencoder(4, 2, True), epoch_batches(loader, 1), 10, lr=0.003, weight_decay=1e-4,
                      schedule="official", batches_per_epoch=1)
    group = made[0].param_groups[0]
    assert group["weight_decay"] == 1e-4 and group["lr"] == pytest.approx(0.0003)  # epoch 10: one decay
    assert made[0].state[made[0].param_groups[0]["params"][0]]["step"] == 11


def hand_made_selector(include_untrained):
    """Features [1, 1]: the reference reconstructs them with error 1, task 0 with 0.25, task 1 (never trained) with
    0 — an untrained autoencoder can win only where the official rule lets it take part."""
    selector = DistributionSelector(SelectorConfig(feature_dim=2, hidden_dim=2, standardize=False,
                                                   include_untrained=include_untrained), num_tasks=2)

    def autoencoder(scale):
        module = FeatureAutoencoder(2, 2, sigmoid_output=False)
        with torch.no_grad():
            module.encoder.weight.copy_(torch.eye(2))
            module.decoder.weight.copy_(scale * torch.eye(2))
            module.encoder.bias.zero_()
            module.decoder.bias.zero_()
        return module

    selector.set_autoencoder(None, autoencoder(0.0))
    selector.set_autoencoder(0, autoencoder(0.5), threshold=0.3)
    with torch.no_grad():  # weights task 1's slot happens to have, untrained
        selector.decoder_weight[2].copy_(torch.eye(2))
        selector.encoder_weight[2].copy_(torch.eye(2))
        selector.encoder_bias[2].zero_()
        selector.decoder_bias[2].zero_()
    selector.thresholds[1] = 0.3  # what MoEAdapters gives tasks not learned yet with ddas_include_untrained
    return selector


def test_untrained_autoencoders_take_part_only_under_the_official_rule():
    features = torch.ones(3, 2)
    masked, official = hand_made_selector(False), hand_made_selector(True)
    assert masked.reconstruction_errors(features)[0].tolist() == [1.0, 0.25, math.inf]
    assert official.reconstruction_errors(features)[0].tolist() == [1.0, 0.25, 0.0]
    def batch_decision(selector):
        return int(selector.select_units(selector.reconstruction_errors(features), len(features))[0])

    assert batch_decision(masked) == 0 and batch_decision(official) == 1
    official.thresholds.fill_(-1.0)  # the single official threshold also bounds the untrained winner
    assert batch_decision(official) == -1


def test_set_autoencoder_refuses_bad_input():
    selector = DistributionSelector(SelectorConfig(feature_dim=2, hidden_dim=2), num_tasks=1)
    with pytest.raises(ValueError, match="reference autoencoder first"):
        selector.set_autoencoder(0, FeatureAutoencoder(2, 2, False), threshold=0.1)
    selector.set_autoencoder(None, FeatureAutoencoder(2, 2, False))
    with pytest.raises(ValueError, match="positive threshold"):
        selector.set_autoencoder(0, FeatureAutoencoder(2, 2, False))
    with pytest.raises(ValueError, match="out of range"):
        selector.set_autoencoder(1, FeatureAutoencoder(2, 2, False), threshold=0.1)
    with pytest.raises(ValueError, match="feature_dim 2, hidden_dim 2"):
        selector.set_autoencoder(0, FeatureAutoencoder(3, 2, False), threshold=0.1)


def test_untrained_autoencoders_need_a_fixed_threshold():
    with pytest.raises(ValueError, match="fixed ddas_threshold"):
        DDASArguments().check_selector(SelectorConfig(include_untrained=True))
    with pytest.raises(ValueError, match="fixed ddas_threshold"):
        MoEAdapters(get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=1, num_experts=4, r=4)),
                    ddas=DDASArguments(ddas=True), selector=SelectorConfig(include_untrained=True))


@pytest.mark.parametrize("bad, match", [
    (dict(ddas_augment_once=True), "ddas_training='official'"),
    (dict(ddas_training="averaged"), r"`ddas_training` must be one of \('sampled', 'official'\), got 'averaged'"),
    (dict(ddas_batch_size=0), "ddas_batch_size"),
    (dict(ddas_reference_shots=0), "ddas_reference_shots"),
])
def test_ddas_arguments_refuse_inconsistent_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        DDASArguments(**bad)


@pytest.mark.parametrize("preset, lr, threshold, shots", [
    ("mtil-order-1", 0.01, 0.0655, None), ("mtil-order-2", 0.01, 0.0655, None),
    ("fewshot-mtil-order-1", 0.003, 0.06, 5), ("fewshot-mtil-order-2", 0.003, 0.06, 5)])
def test_presets_pin_the_official_ddas(preset, lr, threshold, shots):
    """AutoEncoder.py line 180 (0.01), few_shot_AutoEncoder.py line 211 (0.003), both lines 160/192 (weight decay
    1e-4), the scripts' --iterations 1000 / 300 and batch 64, Full_Shot_order1.sh (0.0655) and
    Few_Shot_order1_test.sh (0.06)."""
    recipe = preset_recipe(preset)
    ddas, selector = DDASArguments(**recipe[DDASArguments]), AdapterArguments(**recipe[AdapterArguments])
    assert (ddas.ddas_training, selector.ddas_feature_extractor, ddas.ddas_learning_rate, ddas.ddas_weight_decay) == (
        "official", "alexnet", lr, 1e-4)
    assert (ddas.ddas_reference_steps, ddas.ddas_task_steps, ddas.ddas_batch_size) == (1000, 300, 64)
    assert ddas.ddas_threshold == threshold and selector.ddas_include_untrained
    assert ddas.ddas_reference_shots == shots and ddas.ddas_augment_once == (shots is not None)


def random_alexnet_weights(folder) -> str:
    """A state dict file of randomly initialised AlexNet conv layers (torchvision's layout): the paper's extractor
    without its download."""
    from hf_moe_cl.ddas.features import AlexNetFeatures

    path = folder / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in AlexNetFeatures(weights=None).features.state_dict().items()}, path)
    return str(path)


def one_step_trainer(method, tmp_path, processor) -> ContinualTrainer:
    """A trainer of one step per task, no checkpoints, evaluating only the task just learned: what the DDAS fit
    needs around it."""
    args = ContinualTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, use_cpu=True, report_to="none",
                                      per_device_train_batch_size=4, per_device_eval_batch_size=12, disable_tqdm=True,
                                      logging_strategy="no", save_task_checkpoints=False, evaluate_all_tasks=False)
    return ContinualTrainer(method=method, args=args, processing_class=processor)


def recording_fits(monkeypatch, on_call):
    """Calls `on_call(data, steps, lr, weight_decay, batches_per_epoch)` at every fit of an official autoencoder
    (`data`: the loader of feature batches it trains on), then fits it; returns the autoencoders fitted."""
    from hf_moe_cl.ddas import fitting

    fitted, original = [], fitting.fit_autoencoder

    def recording(feature_dim, hidden_dim, sigmoid_output, data, steps, lr, weight_decay, seed, schedule, **kwargs):
        on_call(data, steps, lr, weight_decay, kwargs["batches_per_epoch"])
        fitted.append(original(feature_dim, hidden_dim, sigmoid_output, data, steps, lr, weight_decay, seed,
                               schedule, **kwargs))
        return fitted[-1]

    monkeypatch.setattr(fitting, "fit_autoencoder", recording)
    return fitted


def counting_augmentation(monkeypatch, augmented, name="random_resized_crop"):
    """Every image the training augmentation crops is added to `augmented` (its bytes)."""
    from hf_moe_cl.continual import context

    original = context.training_augmentation

    def counting(processor, given):
        crop = original(processor, given)
        assert (crop.scale, given) == ((0.9, 1.0), name)  # the official training augmentation

        def augment(image):
            augmented.append(image.tobytes())
            return crop(image)
        return augment

    monkeypatch.setattr(context, "training_augmentation", counting)


def official_alexnet(tmp_path, **settings):
    return (DDASArguments(ddas=True, ddas_task_steps=3, ddas_reference_steps=4, ddas_training="official",
                          ddas_weight_decay=1e-4, ddas_batch_size=4,
                          ddas_alexnet_weights=random_alexnet_weights(tmp_path), **settings),
            SelectorConfig(feature_extractor="alexnet", include_untrained=True))


def test_official_training_trains_every_autoencoder_on_the_augmented_set_and_bounds_untrained_ones(
        tmp_path, module_processor, monkeypatch):
    calls, augmented, collated = [], [], []

    def on_call(data, steps, lr, weight_decay, batches_per_epoch):
        calls.append((len(data.loader.dataset), data.loader.batch_size, steps, lr, weight_decay, batches_per_epoch))
        function = data.function

        def counted(batch):
            collated.append(len(batch["pixel_values"]))
            return function(batch)
        data.function = counted

    recording_fits(monkeypatch, on_call)
    counting_augmentation(monkeypatch, augmented)
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, r=4))
    ddas, selector = official_alexnet(tmp_path, ddas_threshold=0.0655, ddas_learning_rate=0.01)
    method = MoEAdapters(model, ddas=ddas, ddas_reference=noise_images(10, 0), selector=selector)
    trainer = one_step_trainer(method, tmp_path, module_processor)
    trainer.train_tasks([colour_task("first", n_train=9, n_eval=12)])  # of a model with two task routers
    selector = model.base_model.selector
    assert calls == [(10, 4, 4, 0.01, 1e-4, 3), (9, 4, 3, 0.01, 1e-4, 3)]
    assert len(collated) == 5 + 4 and len(augmented) == sum(collated)  # every image of every step was augmented
    assert selector.config.include_untrained and selector.trained.tolist() == [True, True, False]
    assert selector.thresholds.tolist() == pytest.approx([0.0655, 0.0655])  # the untrained task: the same bound


@pytest.mark.parametrize("draw", ["own", "shared"])
def test_few_shot_official_training_augments_each_image_once_and_counts_epochs_over_the_whole_sets(
        tmp_path, module_processor, monkeypatch, draw):
    """few_shot_AutoEncoder.py: the reference is `shots` images per class, every image is augmented once and its
    features then fixed, and the epochs of the rate decay count batches of the whole training set (and the whole
    reference), not of the few-shot draw. A task's autoencoder trains on its own draw of as many shots per class
    (lines 167-177, a process apart from the MoE's draw), or on the model's ('shared')."""
    import dataclasses

    from hf_moe_cl.data.splits import few_shot_subset
    from hf_moe_cl.ddas.settings import ALEXNET_FEATURES

    augmented, calls = [], []
    recording_fits(monkeypatch, lambda data, steps, lr, weight_decay, epoch: calls.append(
        (tuple(data.dataset.shape), steps, lr, epoch)))
    counting_augmentation(monkeypatch, augmented)
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, r=4))
    ddas, selector = official_alexnet(tmp_path, ddas_threshold=0.06, ddas_learning_rate=0.003,
                                      ddas_reference_shots=2, ddas_augment_once=True, ddas_task_draw=draw)
    reference = noise_images(13, 0).add_column("label", [i % 3 for i in range(13)])
    method = MoEAdapters(model, ddas=ddas, ddas_reference=reference, selector=selector)
    trainer = one_step_trainer(method, tmp_path, module_processor)
    whole = colour_task("first", n_train=30, n_eval=12)
    few = dataclasses.replace(whole, train_dataset=few_shot_subset(whole.train_dataset, 2, trainer.args.seed),
                              full_train_dataset=whole.train_dataset)
    trainer.train_tasks([few])
    shots = few_shot_subset(reference, 2, trainer.args.seed)
    # reference: 2 x 3 classes fixed features, 13 images -> 4 batches an epoch; task: 2 x 3, 30 images -> 8 batches
    assert calls == [((6, ALEXNET_FEATURES), 4, 0.003, 4), ((6, ALEXNET_FEATURES), 3, 0.003, 8)]
    own = few_shot_subset(whole.train_dataset, 2, trainer.args.seed + 1)  # task 0's own draw
    assert own["image"] != few.train_dataset["image"]
    task_images = few.train_dataset["image"] if draw == "shared" else own["image"]
    assert sorted(augmented) == sorted(image.convert("RGB").tobytes() for image in [*shots["image"], *task_images])


def test_official_training_on_clip_features_standardises_with_the_reference_and_calibrates_on_held_out_images(
        tmp_path, module_processor, monkeypatch):
    """The official loop is not tied to AlexNet: on CLIP features the inputs are standardised with the reference
    images' (un-augmented) mean and scale, and a task's calibrated threshold is the quantile of its autoencoder's
    errors on a seeded held-out 10 % of its images, which the loop never sees."""
    labels = []
    fitted = recording_fits(monkeypatch, lambda data, *rest: labels.append(list(data.loader.dataset["label"])))
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=1, num_experts=4, r=4))
    ddas = DDASArguments(ddas=True, ddas_training="official", ddas_task_steps=3, ddas_reference_steps=4,
                         ddas_batch_size=4, ddas_quantile=0.5)
    reference = noise_images(10, 0)
    method = MoEAdapters(model, ddas=ddas, ddas_reference=reference)
    trainer = one_step_trainer(method, tmp_path, module_processor)
    task = colour_task("first", n_train=30, n_eval=12)
    trainer.train_tasks([task])
    selector = model.base_model.selector

    def embeddings(images):
        pixels = module_processor.image_processor(images=[image.convert("RGB") for image in images],
                                                  return_tensors="pt")["pixel_values"]
        return method.selector_features(pixels)[0]

    reference_features = embeddings(reference["image"])
    torch.testing.assert_close(selector.feature_mean, reference_features.mean(0))
    torch.testing.assert_close(selector.feature_scale, reference_features.std(0).clamp_min(1e-6))
    held = sorted(torch.randperm(30, generator=torch.Generator().manual_seed(trainer.args.seed + 1))[:3].tolist())
    kept = [i for i in range(30) if i not in held]
    assert [len(batch_labels) for batch_labels in labels] == [10, 27]
    assert labels[1] == [task.train_dataset[i]["label"] for i in kept]
    errors = fitted[1].errors(selector.normalise(embeddings(task.train_dataset.select(held)["image"])))
    assert selector.thresholds.tolist() == pytest.approx([float(errors.median())])
    assert selector.trained.tolist() == [True, True]


@pytest.mark.parametrize("training, max_images, n_train, named, given", [
    ("official", 2000, 9, "small", 9), ("sampled", 2000, 9, "small", 9), ("sampled", 8, 30, "first", 8)])
def test_a_calibrated_threshold_refuses_a_task_too_small_before_training(tmp_path, module_processor, training,
                                                                         max_images, n_train, named, given):
    model = get_peft_model(tiny_clip(), MoELoraConfig(num_tasks=2, num_experts=4, r=4))
    ddas = DDASArguments(ddas=True, ddas_training=training, ddas_task_steps=1, ddas_reference_steps=1,
                         ddas_batch_size=4, ddas_max_images=max_images)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    method = MoEAdapters(model, ddas=ddas, ddas_reference=noise_images(4, 0))
    trainer = one_step_trainer(method, tmp_path, module_processor)
    tasks = [colour_task("first", n_train=30, n_eval=6), colour_task("small", n_train=n_train, n_eval=6)]
    with pytest.raises(ValueError, match=f"Task '{named}' gives DDAS {given} training images: too few to "
                                         "calibrate"):
        trainer.train_tasks(tasks)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())  # nothing trained
