"""Hybrid fine-tuning with the Hugging Face Trainer: ``HybridTrainer`` and
``HybridTrainingArguments`` in place of ``Trainer`` and ``TrainingArguments``; the rest is as usual.

    python examples/trainer.py                                        # packaged all-MiniLM-L6-v2, offline
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/trainer.py  # 2 CPU processes (gloo)
"""

import os

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hybridft.integrations.hf_trainer import HybridTrainer, HybridTrainingArguments
from hybridft.data.models import resolve
from hybridft.data.tasks import load_task

MODEL = resolve(os.environ.get("MODEL", "minilm"))  # a packaged name, a hub id or a local directory
STEPS = int(os.environ.get("STEPS", "100"))
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
# float32, as hybridft train loads models (transformers 5 would keep a bf16/fp16 checkpoint in its dtype)
model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2, dtype=torch.float32),
                       LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier", "pooler"]))
task = load_task("rotten_tomatoes")


def encode(examples):
    return [{**tokenizer(e.text, truncation=True, max_length=64), "labels": e.label} for e in examples]


args = HybridTrainingArguments(
    output_dir="runs/trainer-example", max_steps=STEPS, per_device_train_batch_size=16,
    learning_rate=5e-3, zo_learning_rate=1e-6, zo_eps=1e-3,  # FO (adapter + head), ZO (base weights)
    eval_strategy="steps", eval_steps=0.5, save_steps=0.5, logging_steps=10, report_to="none",
)
trainer = HybridTrainer(
    model=model, args=args, train_dataset=encode(task.train), eval_dataset=encode(task.dev[:500]),
    data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
    compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
)
trainer.train()  # a killed run continues with trainer.train(resume_from_checkpoint=True)
trainer.save_model()  # the adapter and head, and model/: the base weights ZO changed
