"""`loom finetune`: full, LoRA, QLoRA, DPO, reward-model, GRPO or PPO fine-tuning of a
released model."""

from __future__ import annotations

from dataclasses import dataclass

from loom.commands.train import LaunchOptions, launch_or_run

DESCRIPTION = (
    "Fine-tune from a TOML config (model.path, data.path, finetune.method, "
    "lora.*, dpo.*, reward.*, grpo.*, ppo.*, train.*, ...); override any key as "
    "--section.key=value."
)
TAKES_OVERRIDES = True


@dataclass
class Options(LaunchOptions):
    """`loom finetune` starts the way `loom train` does: the same launch options."""


def run(options: Options) -> int:
    from loom.align.trainer import trainer_for
    from loom.finetune.config import load_finetune_config, with_base_architecture

    cfg = load_finetune_config(options.config, options.overrides)
    layout = with_base_architecture(cfg) if options.nproc is not None else cfg
    return launch_or_run(options, cfg, layout, "loom.finetune", trainer_for(cfg))
