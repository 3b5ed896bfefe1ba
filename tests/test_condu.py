import pytest
import torch

from hf_moe_cl.condu import CONDU_WEIGHTS, DeltaStore, applied_delta, decouple, model_fingerprint, pack_mask, unify, unpack_mask
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments
from hf_moe_cl.continual.methods import ConDU, ConDUArguments

from conftest import colour_task, tiny_clip


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


HAND = [{"w": t(1.0, -2.0, 3.0, 0.0)}, {"w": t(2.0, 1.0, -1.0, 0.5)}, {"w": t(-0.5, -1.0, -4.0, 1.0)}]


def test_unify_matches_the_formulas_on_hand_made_deltas():
    unified, masks, rescalers = unify(HAND)
    # summed deltas 2.5, -2, -2, 1.5 -> elected signs +, -, -, +
    assert torch.equal(unified["w"], t(2.0, -2.0, -4.0, 1.0))
    assert [m["w"].tolist() for m in masks] == [[True, True, False, False], [True, False, True, True],
                                                 [False, True, True, True]]
    assert rescalers == pytest.approx([6.0 / 4.0, 4.5 / 7.0, 6.5 / 7.0])
    assert torch.allclose(decouple(unified, masks[0], rescalers[0])["w"], t(3.0, -3.0, 0.0, 0.0))
    assert torch.allclose(decouple(unified, masks[2], rescalers[2])["w"], 6.5 / 7.0 * t(0.0, -2.0, -4.0, 1.0))


def test_sequential_sessions_follow_the_decouple_unify_recurrence():
    store = DeltaStore()
    for delta in HAND:
        store.add_task(delta)
    # by hand: session 2 unifies [d1, d2]; session 3 unifies the two rebuilt deltas with d3
    u2, m2, r2 = unify(HAND[:2])
    rebuilt = [decouple(u2, m2[i], r2[i]) for i in range(2)]
    u3, m3, r3 = unify(rebuilt + [HAND[2]])
    assert torch.equal(store.unified["w"], u3["w"]) and store.rescalers == pytest.approx(r3)
    for task in range(3):
        assert torch.allclose(store.task_delta(task)["w"], decouple(u3, m3[task], r3[task])["w"])


def test_rebuilt_delta_equals_the_original_where_masks_never_change():
    deltas = [{"a": t(1.0, 2.0), "b": t(-1.0, 0.5)}, {"a": t(2.0, 4.0), "b": t(-2.0, 1.0)},
              {"a": t(0.5, 1.0), "b": t(-0.5, 0.25)}]
    store = DeltaStore()
    for delta in deltas:
        store.add_task(delta)
    for task, delta in enumerate(deltas):
        rebuilt = store.task_delta(task)
        assert all(torch.allclose(rebuilt[n], delta[n]) for n in delta), task


def test_masks_are_bit_packed():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 7, 5, generator=generator) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (3 * 7 * 5 + 7) // 8
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    store = DeltaStore()
    for seed in range(3):
        store.add_task({"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))})
    sizes = store.storage_bytes()
    assert sizes["masks"] == 3 * 64 * 32 // 8 and sizes["full_deltas"] == 3 * 64 * 32 * 4
    assert sizes["stored"] < sizes["full_deltas"] / 2


def test_trigger_files_round_trip_and_refuse_another_model(tmp_path):
    store = DeltaStore()
    for delta in HAND:
        store.add_task(delta, {"image": torch.eye(2)}, name="x")
    store.save_pretrained(tmp_path, {"model": "a"})
    loaded = DeltaStore.from_pretrained(tmp_path, {"model": "a"})
    assert loaded.task_names == ["x", "x", "x"] and torch.equal(loaded.prototypes[1]["image"], torch.eye(2))
    for task in range(3):
        assert torch.equal(loaded.task_delta(task)["w"], store.task_delta(task)["w"])
    with pytest.raises(ValueError, match="made for another model"):
        DeltaStore.from_pretrained(tmp_path, {"model": "b"})
    weights = tmp_path / CONDU_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        DeltaStore.from_pretrained(tmp_path, {"model": "a"})
    with pytest.raises(ValueError, match="out of range"):
        store.task_delta(3)
    with pytest.raises(ValueError, match="other tensors"):
        store.add_task({"v": t(1.0)})


def test_condu_end_to_end(tmp_path, clip_processor):
    base = tiny_clip()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    args = ContinualTrainingArguments(output_dir=str(tmp_path), max_steps=4, warmup_steps=1, learning_rate=1e-2,
                                      use_cpu=True, per_device_train_batch_size=8, per_device_eval_batch_size=32,
                                      report_to="none", disable_tqdm=True, logging_strategy="no")
    tasks = [colour_task("first", seed=0), colour_task("second", seed=1, offset=3)]
    method = ConDU(base, ConDUArguments(condu_top_k=1), rank=4)
    trainer = ContinualTrainer(method=method, args=args, processing_class=clip_processor)
    zero_shot_second = trainer.evaluate_task(tasks[1])
    result = trainer.train_tasks(tasks)
    histogram = result.diagnostics["route_histogram"]["per_image"][-1]
    identification = [100.0 * counts[j + 1] / sum(counts) for j, counts in enumerate(histogram)]
    assert result.accuracy_matrix[0][1] == zero_shot_second
    assert len(result.task_agnostic_matrix) == 2 and len(identification) == 2
    assert all(0.0 <= share <= 100.0 for share in identification)
    assert all(torch.equal(reference[k], v) for k, v in base.state_dict().items())  # deltas were undone exactly
    store = method.store
    assert set(store.shapes) == set(method.delta_tensor_names()) and len(store.shapes) == 8
    delta = store.task_delta(1)
    with applied_delta(base, delta):
        changed = {k: v.clone() for k, v in base.state_dict().items()}
    name = next(iter(delta))
    assert torch.allclose(changed[name], reference[name] + delta[name])
    method.save(tmp_path / "triggers")
    other = ConDU(tiny_clip(), rank=4)
    other.load(tmp_path / "triggers")
    assert torch.equal(other.store.task_delta(0)[name], store.task_delta(0)[name])
    bigger = ConDU(tiny_clip(vision_width=64))
    with pytest.raises(ValueError, match="another model"):
        bigger.load(tmp_path / "triggers")
    assert model_fingerprint(base)["vision_width"] == 48
