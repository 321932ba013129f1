"""The config tree of `loom finetune`: a base model, JSONL data, a method, and the same
training, checkpoint, parallel and resilience sections as pretraining."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loom.core.config import (
    Config,
    TrainConfig,
    TrainingSections,
    read_with_overrides,
    tree_from_dict,
    validate,
)
from loom.core.errors import LoomError
from loom.core.lora import LoRAConfig
from loom.models.llama import ModelConfig
from loom.models.sources import describe

Method = Literal["full", "lora", "qlora", "dpo", "reward", "grpo", "ppo", "distill"]
# Methods that learn from the policy's own samples (loom.align): they train through the same
# trainer, but `loom finetune` hands them to the align feature.
ONLINE_METHODS = ("grpo", "ppo")


@dataclass
class BaseModelConfig:
    path: str = ""  # an HF model folder, a .gguf file, or a Loom run folder or checkpoint


@dataclass
class FinetuneDataConfig:
    path: str = ""  # JSONL: chat `messages`, prompt/completion, instruction/input/output;
    # for DPO and reward models: prompt/chosen/rejected; for GRPO and PPO: prompt (a string or
    # chat messages) and any fields the reward functions read
    val_path: str = ""  # a separate validation file; empty = hold out val_fraction of `path`
    val_fraction: float = 0.05
    template: Literal["auto", "chatml", "none"] = "auto"  # auto = the tokenizer's chat template
    overlong: Literal["truncate", "drop"] = "truncate"  # examples longer than train.seq_len
    packing: bool = True  # several examples per row (attention never crosses them)


@dataclass
class MethodConfig:
    method: Method = "lora"


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL anchor to the reference policy
    lora: bool = True  # train LoRA adapters (reference = base with adapters off); false = full
    # fine-tuning against a frozen copy of the base


@dataclass
class RewardConfig:
    # > 0: add this times (r_chosen + r_rejected)² to each pair's loss, keeping the rewards
    # centred on zero (TRL's center_rewards_coefficient; Eisenstein et al. 2023 use 0.01)
    center_rewards_coefficient: float = 0.0


@dataclass
class GRPOConfig:
    """Group-relative policy optimisation (DeepSeekMath): each prompt's `group_size` samples
    are scored, and each sample's advantage is its reward against its group's. PPO reads the
    sampling, reward, clip and adapter settings from here too (`beta`, `loss` and
    `scale_rewards` are GRPO's own; PPO's group_size may be 1)."""

    group_size: int = 8  # completions sampled per prompt
    # Python reward functions as "module:function": each gets prompt=, completion= and the
    # data row's fields as keyword arguments and returns a number
    rewards: list[str] = field(default_factory=list)
    reward_model: str = ""  # a reward model (Loom run or HF folder) scoring prompt + completion
    reward_weights: list[float] = field(default_factory=list)  # functions, then the model; [] = 1s
    beta: float = 0.0  # KL penalty to the reference policy (TRL's default; DeepSeekMath: 0.04)
    clip: float = 0.2  # the policy ratio's clipping range ε
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    # per-token loss averaged: "dapo" over all tokens of the micro-batch, "grpo" per completion
    # then over completions, "dr_grpo" summed over max_new_tokens per completion (Dr. GRPO)
    loss: Literal["dapo", "grpo", "dr_grpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage / std (none: Dr. GRPO)
    lora: bool = True  # train LoRA adapters (reference = adapters off); false = full fine-tuning


@dataclass
class PPOConfig:
    """PPO's own settings (sampling and rewards: [grpo]); defaults as TRL's PPOConfig."""

    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE's λ
    kl_coef: float = 0.05  # per-token KL penalty to the reference, in the rewards
    value_coef: float = 0.1  # weight of the value loss
    value_clip: float = 0.2  # how far a value may move from its rollout estimate
    whiten_advantages: bool = True


@dataclass
class DistillConfig:
    """finetune.method = "distill": the whole student learns the teacher's token distributions
    on the data's trained tokens."""

    teacher: str = ""  # the teacher (HF folder, .gguf or Loom run) over the student's tokenizer
    temperature: float = 1.0  # both distributions softened by it (loss scaled by its square)
    alpha: float = 0.0  # weight of the data's own next-token loss beside the KL (0: KL only)


@dataclass
class FinetuneConfig(TrainingSections):
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    finetune: MethodConfig = field(default_factory=MethodConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, seq_len=512))

    @property
    def uses_lora(self) -> bool:
        method = self.finetune.method
        return (
            method in ("lora", "qlora")
            or (method == "dpo" and self.dpo.lora)
            or (method in ONLINE_METHODS and self.grpo.lora)
        )

    @property
    def needs_reference(self) -> bool:
        """A frozen copy of the base beside the policy: DPO, or GRPO's or PPO's KL term, in full
        fine-tuning (with adapters the reference is the policy with its adapters off)."""
        return not self.uses_lora and (self.finetune.method == "dpo" or self.kl_to_reference)

    @property
    def kl_to_reference(self) -> bool:
        method = self.finetune.method
        return (method == "grpo" and self.grpo.beta > 0) or (
            method == "ppo" and self.ppo.kl_coef > 0
        )


# Learning rates that suit each method unless the config says otherwise (pretraining's 3e-3
# would wreck a pretrained model): adapters start from zero and take a larger step.
DEFAULT_LR = {
    "full": 2e-5,
    "lora": 2e-4,
    "qlora": 2e-4,
    "dpo": 5e-6,
    "dpo-lora": 5e-5,
    "reward": 1e-5,
    "grpo": 1e-6,
    "grpo-lora": 1e-5,
    "ppo": 1e-6,
    "ppo-lora": 1e-5,
    "distill": 1e-4,  # (students are often small, or new)
}


def load_finetune_config(path: str | Path | None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    raw = read_with_overrides(path, overrides)
    cfg = finetune_config_from_dict(raw)
    validate_finetune(cfg)
    return cfg


def finetune_config_from_dict(raw: dict[str, Any]) -> FinetuneConfig:
    """The tree with the per-method learning rate and no weight decay, unless `raw` sets them."""
    cfg = tree_from_dict(FinetuneConfig, raw)
    set_by_user = raw.get("optimizer", {})
    if "lr" not in set_by_user:
        method = cfg.finetune.method
        adapters = (method == "dpo" and cfg.dpo.lora) or (
            method in ONLINE_METHODS and cfg.grpo.lora
        )
        cfg.optimizer.lr = DEFAULT_LR[f"{method}-lora" if adapters else method]
    if "weight_decay" not in set_by_user:
        cfg.optimizer.weight_decay = 0.0
    return cfg


def validate_finetune(cfg: FinetuneConfig) -> None:
    if not cfg.model.path:
        raise LoomError(
            "model.path is not set; pass --model.path=PATH (an HF model folder, a .gguf file or "
            "a Loom run folder)"
        )
    if not Path(cfg.model.path).exists():
        raise LoomError(f"model.path {cfg.model.path} does not exist")
    if not cfg.data.path:
        raise LoomError("data.path is not set; pass --data.path=FILE.jsonl")
    for key, value in (("data.path", cfg.data.path), ("data.val_path", cfg.data.val_path)):
        if value and not Path(value).is_file():
            raise LoomError(f"{key} {value} is not a file; give a JSONL file")
    if not 0 <= cfg.data.val_fraction < 1:
        raise LoomError(f"data.val_fraction={cfg.data.val_fraction} must be in [0, 1)")
    if cfg.dpo.beta <= 0:
        raise LoomError(f"dpo.beta={cfg.dpo.beta} must be greater than 0")
    if cfg.reward.center_rewards_coefficient < 0:
        raise LoomError(
            f"reward.center_rewards_coefficient={cfg.reward.center_rewards_coefficient} must be "
            "0 (off) or more"
        )
    if cfg.finetune.method in ONLINE_METHODS:
        validate_grpo(cfg)
    if cfg.finetune.method == "distill":
        validate_distill(cfg.distill)
    if cfg.finetune.method == "reward" and cfg.train.seq_len < 2:
        raise LoomError("finetune.method=reward scores whole sequences: train.seq_len must be >= 2")
    if cfg.uses_lora:
        cfg.lora.validate()
    p = cfg.parallel
    if p.pp > 1:
        raise LoomError(
            "parallel.pp > 1: fine-tuning runs data parallel (FSDP/DDP) and tensor parallel "
            "(full fine-tuning); set parallel.pp=1"
        )
    pairs = cfg.finetune.method in ("dpo", "reward", "distill", *ONLINE_METHODS)
    if p.tp > 1 and (cfg.uses_lora or cfg.data.packing or pairs):
        raise LoomError(
            "parallel.tp > 1 works for full fine-tuning without packing only; set parallel.tp=1 "
            "(FSDP shards the model as well) or finetune.method=full with data.packing=false"
        )
    if p.cp > 1 and pairs:
        raise LoomError(
            "parallel.cp > 1 splits the sequences of SFT, LoRA and full fine-tuning; DPO, "
            "reward models, distillation and RL read whole sequences in one process each: set "
            "parallel.cp=1"
        )
    if cfg.finetune.method == "qlora" and (p.dp_replicate > 1 or p.tp > 1 or p.dp_shard > 1):
        raise LoomError(
            "finetune.method=qlora runs in one process (NF4 weights are not sharded yet); "
            "launch without --nproc and leave [parallel] at its defaults"
        )
    if cfg.finetune.method == "qlora" and cfg.memory.offload == "params":
        raise LoomError(
            "finetune.method=qlora keeps the NF4 base on the device: FSDP's memory.offload=params "
            "does not take NF4 weights; set memory.offload=none or finetune.method=lora"
        )


def validate_distill(d: DistillConfig) -> None:
    if not d.teacher:
        raise LoomError(
            "finetune.method=distill needs a teacher: set distill.teacher=PATH (an HF folder, "
            "a .gguf file or a Loom run over the student's tokenizer)"
        )
    if not Path(d.teacher).exists():
        raise LoomError(f"distill.teacher {d.teacher} does not exist")
    if d.temperature <= 0:
        raise LoomError(f"distill.temperature={d.temperature} must be greater than 0")
    if not 0 <= d.alpha <= 1:
        raise LoomError(f"distill.alpha={d.alpha} must be in [0, 1]")


def validate_grpo(cfg: FinetuneConfig) -> None:
    g = cfg.grpo
    if cfg.finetune.method == "ppo":
        validate_ppo(cfg)
    elif g.group_size < 2:
        raise LoomError(
            f"grpo.group_size={g.group_size}: advantages compare samples of one prompt; "
            "set 2 or more"
        )
    if not g.rewards and not g.reward_model:
        raise LoomError(
            'finetune.method=grpo needs rewards: grpo.rewards = ["module:function", ...] and/or '
            "grpo.reward_model = PATH"
        )
    for name in g.rewards:
        module, _, function = name.partition(":")
        if not module or not function:
            raise LoomError(f'grpo.rewards entry {name!r} must read "module:function"')
    count = len(g.rewards) + bool(g.reward_model)
    if g.reward_weights and len(g.reward_weights) != count:
        raise LoomError(
            f"grpo.reward_weights has {len(g.reward_weights)} weights for {count} rewards (the "
            "functions, then the reward model); give one each or leave it empty"
        )
    if g.reward_model and not Path(g.reward_model).exists():
        raise LoomError(f"grpo.reward_model {g.reward_model} does not exist")
    for key, value in (("beta", g.beta), ("clip", g.clip), ("temperature", g.temperature)):
        if value < 0:
            raise LoomError(f"grpo.{key}={value} must be 0 or more")
    if g.temperature == 0:
        raise LoomError("grpo.temperature=0 samples one answer per prompt: use a temperature > 0")
    if not 0 < g.top_p <= 1:
        raise LoomError(f"grpo.top_p={g.top_p} must be in (0, 1]")
    if g.max_new_tokens < 1:
        raise LoomError(f"grpo.max_new_tokens={g.max_new_tokens} must be at least 1")
    if cfg.train.seq_len <= g.max_new_tokens:
        raise LoomError(
            f"train.seq_len={cfg.train.seq_len} leaves no room for a prompt before "
            f"grpo.max_new_tokens={g.max_new_tokens}; raise train.seq_len"
        )


def validate_ppo(cfg: FinetuneConfig) -> None:
    p = cfg.ppo
    if cfg.grpo.group_size < 1:
        raise LoomError(f"grpo.group_size={cfg.grpo.group_size}: PPO samples at least 1 per prompt")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(p, key) <= 1:
            raise LoomError(f"ppo.{key}={getattr(p, key)} must be in [0, 1]")
    for key in ("kl_coef", "value_coef", "value_clip"):
        if getattr(p, key) < 0:
            raise LoomError(f"ppo.{key}={getattr(p, key)} must be 0 or more")


def training_config(cfg: FinetuneConfig, model: ModelConfig) -> Config:
    """The pretraining Config the shared trainer runs on: the base model's architecture and
    this config's training sections (validated like any training config)."""
    if cfg.train.seq_len > model.max_seq_len:
        raise LoomError(
            f"train.seq_len={cfg.train.seq_len} exceeds the base model's context of "
            f"{model.max_seq_len} tokens; lower train.seq_len"
        )
    train_cfg = Config(model=model, **cfg.sections())
    validate(train_cfg)
    return train_cfg


def with_base_architecture(cfg: FinetuneConfig) -> Config:
    """`training_config` with the base model's architecture read from model.path."""
    with tempfile.TemporaryDirectory() as scratch:
        base, _ = describe(Path(cfg.model.path), Path(scratch))
    return training_config(cfg, base)
