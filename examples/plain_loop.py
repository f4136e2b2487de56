"""Hybrid fine-tuning in a plain torch loop: ZO on the base weights, AdamW on the LoRA adapter
and the classification head, through ``HybridOptimizer.step(closure)``.

    python examples/plain_loop.py                       # packaged all-MiniLM-L6-v2, offline
    MODEL=bert-base-uncased STEPS=500 python examples/plain_loop.py
"""

import os

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hybridft import HybridOptimizer, ReshufflingSampler, TwoSided
from hybridft.engine.methods import assign
from hybridft.data.models import resolve
from hybridft.data.tasks import load_task

MODEL = resolve(os.environ.get("MODEL", "minilm"))  # a packaged name, a hub id or a local directory
STEPS = int(os.environ.get("STEPS", "100"))
torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
# float32, as hybridft train loads models (transformers 5 would keep a bf16/fp16 checkpoint in its dtype)
model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2, dtype=torch.float32),
                       LoraConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier", "pooler"]))
groups = assign("hybrid", model)  # base weights -> ZO (requires_grad off); adapter + head -> FO
optimizer = HybridOptimizer(model, groups.zo, torch.optim.AdamW(groups.fo.values(), lr=5e-3), lr=1e-6, seed=0,
                            estimator=TwoSided(eps=1e-3))
task = load_task("rotten_tomatoes")

for step, indices in zip(range(STEPS), ReshufflingSampler(len(task.train), 16, seed=0)):
    batch = tokenizer([task.train[i].text for i in indices], padding=True, truncation=True, max_length=64, return_tensors="pt")
    batch["labels"] = torch.tensor([task.train[i].label for i in indices])

    def closure():  # torch's LBFGS contract: recompute the loss; backward only when grad is enabled
        model.train(torch.is_grad_enabled())  # the ZO forwards run under no_grad, in eval mode
        optimizer.zero_grad()
        loss = model(**batch).loss
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    loss = optimizer.step(closure)  # 2 no-grad forwards at theta +- eps z, then 1 forward + backward
    if step % 10 == 0:
        print(f"step {step}: loss {loss:.4f}")

model.eval()
dev = task.dev[:500]
with torch.no_grad():
    inputs = tokenizer([e.text for e in dev], padding=True, truncation=True, max_length=64, return_tensors="pt")
    predictions = model(**inputs).logits.argmax(-1)
print("dev accuracy:", (predictions == torch.tensor([e.label for e in dev])).float().mean().item())
