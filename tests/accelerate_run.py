"""Run under ``accelerate launch``: a HybridTrainer set up like the CLI run of CONFIG.json, on
every process; the main process writes the trained weights to OUT/weights.safetensors and the
world size to OUT/world.json.

    accelerate launch --multi_gpu --num_processes 2 -m tests.accelerate_run CONFIG.json OUT
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from hybridft.run.config import TrainConfig
from tests.trainer_runs import trainer

config_file, out = sys.argv[1], Path(sys.argv[2])
run = trainer(TrainConfig(**json.loads(Path(config_file).read_text())), out)
run.train()
if run.is_world_process_zero():
    save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, out / "weights.safetensors")
    (out / "world.json").write_text(json.dumps({"world_size": run.args.world_size, "global_step": run.state.global_step}))
