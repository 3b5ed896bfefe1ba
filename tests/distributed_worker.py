"""Trains two tiny tasks and dumps frozen sets, counts and adapter weights; run alone or under torchrun.

    python tests/distributed_worker.py OUT GLOBAL_BATCH
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT GLOBAL_BATCH
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conftest import colour_task, tiny_clip, tiny_clip_processor, write_tiny_tokenizer  # noqa: E402
from hf_moe_cl import MoELoraConfig  # noqa: E402
from hf_moe_cl.continual import ContinualTrainer, ContinualTrainingArguments  # noqa: E402
from hf_moe_cl.continual.methods import MoEAdapters, MoEAdaptersArguments  # noqa: E402


def main(out: str, global_batch: int) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    token_dir = write_tiny_tokenizer(Path(tempfile.mkdtemp()))
    processor = tiny_clip_processor(token_dir)
    config = MoELoraConfig(num_tasks=2, num_experts=6, top_k=2, r=4, noisy_gating=False, expert_dropout=0.0)
    model = get_peft_model(tiny_clip(), config)
    args = ContinualTrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=4, warmup_steps=1, learning_rate=1e-2, use_cpu=True,
        per_device_train_batch_size=global_batch, per_device_eval_batch_size=16, report_to="none",
        disable_tqdm=True, logging_strategy="no", seed=5, save_task_checkpoints=False,
        accelerator_config={"split_batches": True}, train_augmentation="none",  # random crops differ per process
    )
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
    main(sys.argv[1], int(sys.argv[2]))
