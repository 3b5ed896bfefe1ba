"""Trains two tiny tasks and dumps frozen sets, counts and adapter weights; run alone or under torchrun.

    python tests/distributed_worker.py OUT GLOBAL_BATCH
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT GLOBAL_BATCH
    ... tests/distributed_worker.py OUT GLOBAL_BATCH ddas-condu   (MoE-Adapters with DDAS, then ConDU)
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import colour_task, noise_images, tiny_clip, tiny_clip_processor, write_tiny_tokenizer  # noqa: E402
from hf_moe_cl import MoELoraConfig  # noqa: E402
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments  # noqa: E402
from hf_moe_cl.continual.methods import DDASArguments, MoEAdapters, MoEAdaptersArguments  # noqa: E402
from hf_moe_cl.continual.methods.condu import ConDU, ConDUArguments  # noqa: E402


def arguments(out: str, global_batch: int, **overrides) -> ContinualTrainingArguments:
    options = dict(
        output_dir=out, max_steps=4, warmup_steps=1, learning_rate=1e-2, use_cpu=True,
        per_device_train_batch_size=global_batch, per_device_eval_batch_size=16, report_to="none",
        disable_tqdm=True, logging_strategy="no", seed=5, save_task_checkpoints=False,
        accelerator_config={"split_batches": True}, train_augmentation="none",  # random crops differ per process
    )
    return ContinualTrainingArguments(**{**options, **overrides})


def ddas_and_condu(out: str, global_batch: int, processor, world: int, rank: int) -> None:
    """MoE-Adapters with a DDAS selector (checkpoints written), then ConDU; 33 training and 13 test images per task:
    the last feature batch is split unevenly and protocol units of 4 images are dealt out unevenly."""
    tasks = [colour_task("first", n_train=33, n_eval=13, seed=0),
             colour_task("second", n_train=33, n_eval=13, seed=1, offset=3)]
    config = MoELoraConfig(num_tasks=2, num_experts=6, top_k=2, r=4, noisy_gating=False, expert_dropout=0.0)
    model = get_peft_model(tiny_clip(), config)
    ddas = DDASArguments(ddas=True, ddas_task_steps=50, ddas_reference_steps=50, ddas_learning_rate=1e-2,
                         ddas_hidden_dim=16, ddas_quantile=0.9)
    method = MoEAdapters(model, MoEAdaptersArguments(), ddas=ddas, ddas_reference=noise_images(31, 0))
    args = arguments(os.path.join(out, "ddas"), global_batch, save_task_checkpoints=True, task_agnostic_eval=True,
                     protocol_unit=4, per_device_eval_batch_size=4)
    result = ContinualTrainer(method=method, args=args, processing_class=processor).train_tasks(tasks)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if "moe_lora_selector" in k}
    condu = ConDU(tiny_clip(), ConDUArguments(condu_top_k=1, condu_prototype_images="plain"), rank=4)
    condu_result = ContinualTrainer(method=condu, args=arguments(os.path.join(out, "condu"), global_batch),
                                    processing_class=processor).train_tasks(tasks)
    store = condu.store
    tensors.update({f"unified.{k}": v.contiguous() for k, v in store.unified_tensors.items()})
    for task, prototypes in enumerate(store.prototypes):
        tensors.update({f"prototypes.{task}.{k}": v.contiguous() for k, v in prototypes.items()})
        tensors.update({f"delta.{task}.{k}": v.contiguous() for k, v in condu.task_delta(task).items()})
    save_file(tensors, os.path.join(out, f"tensors-{rank}.safetensors"))  # every process: they must agree
    if rank == 0:
        files = sorted(str(p.relative_to(out)) for p in Path(out).rglob("*") if p.is_file() and p.parent != Path(out))
        summary = {"world": world, "files": files, "matrices": result.matrices, "condu_matrices": condu_result.matrices,
                   "histograms": result.diagnostics["route_histogram"],
                   "condu_histograms": condu_result.diagnostics["route_histogram"]}
        with open(os.path.join(out, "summary.json"), "w") as handle:
            json.dump(summary, handle)


def main(out: str, global_batch: int, mode: str = "moe") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    token_dir = write_tiny_tokenizer(Path(tempfile.mkdtemp()))
    processor = tiny_clip_processor(token_dir)
    if mode == "ddas-condu":
        return ddas_and_condu(out, global_batch, processor, world, rank)
    config = MoELoraConfig(num_tasks=2, num_experts=6, top_k=2, r=4, noisy_gating=False, expert_dropout=0.0)
    model = get_peft_model(tiny_clip(), config)
    args = arguments(os.path.join(out, "run"), global_batch)
    tasks = [colour_task("first", n_train=32, seed=0), colour_task("second", n_train=32, seed=1, offset=3)]
    method = MoEAdapters(model, MoEAdaptersArguments(merge_experts_every=3))
    trainer = ContinualTrainer(method=method, args=args, processing_class=processor)
    result = trainer.train_tasks(tasks)
    if rank == 0:
        moe = model.base_model
        summary = {
            "world": world,
            "frozen": {k: {str(e): t for e, t in v.items()} for k, v in moe.frozen_experts().items()},
            "counts": {k: v.tolist() for k, v in moe.selection_counts().items()},
            "matrices": result.matrices,
        }
        with open(os.path.join(out, "summary.json"), "w") as handle:
            json.dump(summary, handle)
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if ".moe_lora_" in k}
        save_file(weights, os.path.join(out, "weights.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
