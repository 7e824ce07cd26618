"""`deepspeed`: training stages run like under `accelerate` (same launch, node scripts and Slurm file),
with DeepSpeed ZeRO configured by a JSON generated from `[backend.deepspeed]` (or your own
`config_file`), checked with DeepSpeed's own parser before anything starts, stored in the stage folder as
deepspeed.json and given to the HF Trainer (`TrainingArguments(deepspeed=...)`), which fills its "auto"
values (batch sizes, accumulation, clipping, learning rate) from the stage's options.

The processes are started as plain one-per-device torch processes (accelerate's MULTI_GPU, or torchrun):
the Trainer turns DeepSpeed on from its arguments, the route the HF documentation gives for torchrun.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmforge.errors import Problem, UsageError
from llmforge_plugins.backends.files import Launch, write_atomic
from llmforge_plugins.backends.launch import LaunchingBackend, require
from llmforge_plugins.backends.options import DeepSpeedBackendOptions

CONFIG_NAME = "deepspeed.json"


class DeepSpeedBackend(LaunchingBackend):
    name = "deepspeed"
    summary = "Like accelerate, with DeepSpeed ZeRO 1/2/3, offload and ZeRO++ from [backend.deepspeed]."
    Options = DeepSpeedBackendOptions
    settings: DeepSpeedBackendOptions  # Backend(settings) is handed its own Options (the type narrowed)

    @property
    def ds(self):
        return self.settings.deepspeed

    def user_config(self, project_dir: Path) -> Path | None:
        if not self.ds.config_file:
            return None
        path = Path(self.ds.config_file)
        return path if path.is_absolute() else project_dir / path

    def config_for(self, options: Any, project_dir: Path) -> dict:
        """The DeepSpeed JSON for a stage: the user's file, or one generated from [backend.deepspeed]."""
        from llmforge_plugins.backends import dsconfig

        user = self.user_config(project_dir)
        if user is not None:
            return dsconfig.load_user_config(user)
        # "auto" leaves bf16/fp16 to the Trainer, which resolves the stage's precision in each process.
        return dsconfig.build_deepspeed_config(self.ds, precision=getattr(options, "precision", "auto"))

    def check(self, cfg: Any) -> list[Problem]:
        problems = super().check(cfg)
        missing = require("deepspeed", "pip install deepspeed")
        if missing is not None:
            return problems + [missing]
        if self.settings.tp_size > 1:
            problems.append(
                Problem(
                    "backend.tp_size",
                    "tensor parallelism through transformers' tp_plan is not "
                    'combined with DeepSpeed here; use type = "accelerate" with launcher = '
                    '"torchrun"',
                )
            )
        return problems

    def check_stage(self, spec: Any, cfg: Any) -> list[Problem]:
        problems = []
        try:
            self.config_for(spec.options, cfg.project_dir)
        except UsageError as exc:
            key = "backend.deepspeed.config_file" if self.ds.config_file else "backend.deepspeed"
            message = exc.message
            if message.startswith("backend.deepspeed."):
                key, _, message = message.partition(": ")
            problems.append(Problem(key, message))
        lora = getattr(spec.options, "lora", None)
        if self.ds.zero_stage == 3 and getattr(lora, "enabled", False) and getattr(spec.options, "merge", False):
            problems.append(
                Problem(
                    f"{spec.where}.merge",
                    "merging the LoRA adapter needs the whole base model in "
                    "one process, which ZeRO-3 shards: leave merge = false and add a `merge` "
                    "stage after it",
                )
            )
        return problems

    def prepare_files(self, stage: Any, options: Any, ctx: Any, launch: Launch) -> list[Path]:
        from llmforge_plugins.backends import dsconfig

        config = self.config_for(options, ctx.project_dir)
        source = self.user_config(ctx.project_dir) or "deepspeed config generated from [backend.deepspeed]"
        dsconfig.validate_deepspeed_config(
            config,
            micro_batch=options.micro_batch_size,
            grad_accum=options.gradient_accumulation,
            world_size=self.world_size,
            source=source,
        )
        path = ctx.stage_dir / CONFIG_NAME
        write_atomic(path, json.dumps(config, indent=2) + "\n")
        ctx.info["deepspeed_config"] = str(path)
        return [path]

    def trainer_args(self, ctx: Any) -> dict[str, Any]:
        return {"deepspeed": str(ctx.stage_dir / CONFIG_NAME)}
