"""A Hugging Face Trainer run under torchrun: TrainingArguments(deepspeed=<JSON naming AdaDiag++>) and
ds_structopt's StructOptTrainer on a tiny LLaMA; rank 0 writes losses, lrs and every rank's metrics."""
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import ds_structopt as dso
from ds_structopt.integrations.hf_trainer import StructOptTrainer


class Patterns(torch.utils.data.Dataset):
    """Learnable sequences (arithmetic progressions mod 256)."""

    def __len__(self):
        return 512

    def __getitem__(self, i):
        x = torch.arange(17) * (i % 7 + 1) % 256
        return {"input_ids": x[:-1], "labels": x[1:]}


class Record(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def main(stage: int, out: str, mode: str = "train") -> None:
    """``mode``: "train" (20 steps), "save" (20 steps, checkpoint at step 10, a loss every step),
    "resume" (from that step-10 checkpoint to step 20, a loss every step)."""
    torch.set_num_threads(1)
    config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdaDiag++", "params": {"lr": "auto", "update_freq": 5, "stagger_refresh": True}},
              "ds_structopt": {"ownership": "local"}}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=32))
    run_dir = os.path.join(os.path.dirname(out), f"hf-z{stage}")
    args = TrainingArguments(output_dir=run_dir if mode != "resume" else run_dir + "-resumed", deepspeed=config,
                             max_steps=20, per_device_train_batch_size=4, learning_rate=3e-3, warmup_steps=2,
                             lr_scheduler_type="linear", logging_steps=5 if mode == "train" else 1, report_to=[],
                             use_cpu=True, save_strategy="steps" if mode == "save" else "no", save_steps=10, seed=0)
    record = Record()
    trainer = StructOptTrainer(model=model, args=args, train_dataset=Patterns(), callbacks=[record])
    trainer.train(resume_from_checkpoint=os.path.join(run_dir, "checkpoint-10") if mode == "resume" else None)
    metrics = [None] * dist.get_world_size()
    dist.all_gather_object(metrics, dso.metrics(trainer.deepspeed))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"losses": record.losses, "metrics": metrics,
                       "final_lrs": [g["lr"] for g in trainer.optimizer.param_groups],
                       "engine_optimizer": type(trainer.deepspeed.optimizer).__name__}, f)
    dist.barrier()
    print("WORKER-DONE", flush=True)  # the test tolerates a gloo teardown abort after this line
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])
