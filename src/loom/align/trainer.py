"""GRPO and PPO through the shared trainer: each micro-step samples `group_size` completions of
each of its prompts with the serving engine, scores them, and takes the policy-gradient step
on them. Everything else (LoRA or full weights, the reference, checkpoints, resume, guards,
metrics) is fine-tuning's."""

from __future__ import annotations

import math
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from loom.align.grpo import GRPOLoss, group_advantages, grpo_loss, token_logps
from loom.align.ppo import gae, kl_estimate, ppo_loss, token_rewards, whiten
from loom.align.prompts import Prompt, PromptLoader, load_prompts
from loom.align.rewards import Rewards
from loom.align.rollout import Completion, Rollouts
from loom.core import distributed
from loom.core.chat import ChatTemplate
from loom.core.config import Config
from loom.core.lora import adapters_disabled, apply_lora
from loom.core.tokenizer import tokenizer_hash
from loom.finetune.config import ONLINE_METHODS, FinetuneConfig
from loom.finetune.trainer import Finetuning, finetune, fingerprint
from loom.models.llama import ModelConfig, Transformer, build_model
from loom.parallel.parallelize import ParallelModel
from loom.parallel.recompute import clean_name
from loom.train.task import TaskData, TrainTask
from loom.train.trainer import Trainer, TrainResult

VALUE_HEAD = "value_head.weight"  # PPO's, on the policy


class OnlineFinetuning(Finetuning):
    """An online run's own state (GRPO's; PPO adds its value head): the prompts, the rollout
    engine, the rewards, and the figures kept between metric records."""

    def __init__(self, ft: FinetuneConfig) -> None:
        super().__init__(ft)
        self.grpo = ft.grpo
        self.prompts: list[Prompt] = []
        self.rollouts: Rollouts | None = None
        self.rewards = Rewards(ft.grpo)  # (the functions imported before anything starts)
        self._rewards_scratch = tempfile.TemporaryDirectory(prefix="loom-reward-")
        self._records: list[dict[str, float]] = []  # one per micro-step since the last record
        self._val: dict[str, float] = {}
        self._drawn: tuple[int, Counter[int]] = (-1, Counter())  # (step, draws of each prompt)
        self.sampler: Transformer | None = None  # the rollouts' copy of the policy (> 1 rank)
        self._synced = -1  # the step whose weights the copy holds

    def task(self) -> TrainTask:
        task = super().task()
        task.metrics = self.metrics
        return task

    # -- data and model -----------------------------------------------------------------------

    def open_data(self, cfg: Config) -> TaskData:
        ft, t, g = self.ft, cfg.train, self.grpo
        self.tokenizer, tokenizer_dir = self.base_tokenizer(cfg)
        self.tokenizer_dir = tokenizer_dir
        self.template = template = ChatTemplate.from_tokenizer_dir(tokenizer_dir, ft.data.template)
        longest = t.seq_len - g.max_new_tokens  # (positive: checked with the config)
        d = ft.data
        val_path = Path(d.val_path) if d.val_path else None
        self.prompts, val, self.report = load_prompts(
            Path(d.path), val_path, self.tokenizer, template, longest, d.val_fraction, t.seed
        )
        loader = PromptLoader(self.prompts, t.seq_len, t.seed)
        identity = [fingerprint(d, t.seed)]
        return TaskData(
            loader, [val] if val else [], identity, tokenizer_hash(self.tokenizer), tokenizer_dir
        )

    def build_model(self, trainer: Trainer, mesh: DeviceMesh | None) -> ParallelModel:
        """The policy; rollouts run on it (one process) or on a whole copy per rank that each
        step's weights are gathered into (sharded over data-parallel ranks: each rank samples
        for its own prompts, and an FSDP module would need every rank in each forward)."""
        model = super().build_model(trainer, mesh)
        self._trainer = trainer
        sampler = model.parts[0]
        if trainer.dims.world_size > 1:
            sampler = build_model(trainer.cfg.model, trainer.device)
            sampler.init_buffers()
            if self.ft.uses_lora:
                apply_lora(sampler, self.ft.lora)
            self.sampler = sampler.requires_grad_(False)
        self.rollouts = Rollouts(sampler, self.tokenizer, self.tokenizer_dir, self.template)
        self.rewards.load_model(trainer.device, Path(self._rewards_scratch.name))
        return model

    def _sync(self) -> None:
        """Gather this step's policy weights into the sampling copy (every rank at once)."""
        trainer = self._trainer
        if self.sampler is None or self._synced == trainer.step:
            return
        options = StateDictOptions(full_state_dict=True)
        state = get_model_state_dict(trainer.model.parts[0], options=options)
        state = {clean_name(k): v for k, v in state.items()}
        state.pop(VALUE_HEAD, None)  # (PPO's: not needed to sample)
        self.sampler.load_state_dict(state)
        self._synced = trainer.step

    # -- one step -----------------------------------------------------------------------------

    def _seeds(self, trainer: Trainer, indices: list[int]) -> list[int]:
        """Sampling seeds of the completions of the prompts at `indices` (group_size each),
        from (train.seed, step, how often this step drew the prompt before, prompt): a resumed
        run samples what the uninterrupted one did, and a prompt's samples depend neither on
        the rank drawing it nor on the micro-step (one process accumulating micro-batches
        samples what several ranks do)."""
        if self._drawn[0] != trainer.step:
            self._drawn = (trainer.step, Counter())
        drawn = self._drawn[1]
        seeds = []
        for index in indices:
            key = f"{trainer.cfg.train.seed}/{trainer.step}/{drawn[index]}/{index}"
            drawn[index] += 1
            base = zlib.crc32(key.encode()) << 12
            seeds += [base + j for j in range(self.grpo.group_size)]
        return seeds

    def sample(
        self, prompts: list[Prompt], seeds: list[int], greedy: bool = False
    ) -> list[Completion]:
        """`len(seeds) // len(prompts)` completions of each prompt, in prompt order."""
        assert self.rollouts is not None
        self._sync()
        per_prompt = len(seeds) // len(prompts)
        g = self.grpo
        return self.rollouts.sample(
            [p.ids for p in prompts for _ in range(per_prompt)],
            seeds,
            g.max_new_tokens,
            0.0 if greedy else g.temperature,
            1.0 if greedy else g.top_p,
        )

    def score(
        self, prompts: list[Prompt], completions: list[Completion]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each completion's reward per source and weighted (completion text without the
        end-of-text token)."""
        per_prompt = len(completions) // len(prompts)
        texts = [
            self.tokenizer.decode(c.ids[:-1] if c.stopped else c.ids, skip_special_tokens=True)
            for c in completions
        ]
        records = [p.record for p in prompts for _ in range(per_prompt)]
        return self.rewards.score(records, texts)

    def completion_logps(
        self,
        trainer: Trainer,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        with_reference: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Log-probabilities [completions, longest completion] of the completions' tokens under
        the policy (with gradients) and the reference (or None), at the sampling temperature;
        the mask of real tokens; and where each token's logits sit in the padded rows."""
        device = trainer.device
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
        tokens = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        longest = max(map(len, completion_ids))
        index = torch.zeros(len(prompt_ids), longest, dtype=torch.long)  # completion positions
        mask = torch.zeros(len(prompt_ids), longest, dtype=torch.bool)
        for row, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            tokens[row, : len(p) + len(c)] = torch.tensor(p + c)
            index[row, : len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            mask[row, : len(c)] = True
        tokens, index, mask = tokens.to(device), index.to(device), mask.to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].gather(1, index)
        policy = trainer.model.parts[0]

        def logps_of(model: torch.nn.Module) -> torch.Tensor:
            logits = model(inputs)
            picked = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1]))
            return token_logps(picked, targets, self.grpo.temperature)

        with trainer.model.autocast:
            logps = logps_of(policy)
            ref_logps = None
            if with_reference:
                off: AbstractContextManager[object] = (
                    adapters_disabled(policy) if self.reference is None else nullcontext()
                )
                reference = policy if self.reference is None else self.reference.parts[0]
                with torch.no_grad(), off:
                    ref_logps = logps_of(reference)
        return logps, ref_logps, mask, index

    def policy_loss(
        self,
        trainer: Trainer,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None = None,
    ) -> GRPOLoss:
        """GRPO's loss of completions of prompts (one row each, right-padded), with gradients.
        `old_logps` [completions, longest completion]: the sampling policy's (None: this
        policy's, detached: one update per rollout)."""
        g = self.grpo
        logps, ref_logps, mask, _ = self.completion_logps(
            trainer, prompt_ids, completion_ids, bool(g.beta)
        )
        old = logps.detach() if old_logps is None else old_logps.to(logps.device)
        advantages = advantages.to(logps.device)
        return grpo_loss(
            logps, old, ref_logps, advantages, mask, g.beta, g.clip, g.loss, g.max_new_tokens
        )

    def micro_step(
        self, trainer: Trainer, batch: list[torch.Tensor], scale: float
    ) -> torch.Tensor | None:
        """Sample, score, update; the figures of each part kept for the metrics."""
        g = self.grpo
        indices = batch[0].tolist()
        prompts = [self.prompts[i] for i in indices]
        began = time.perf_counter()
        completions = self.sample(prompts, self._seeds(trainer, indices))
        sampled = time.perf_counter()
        per_source, rewards = self.score(prompts, completions)
        scored = time.perf_counter()
        prompt_ids = [p.ids for p in prompts for _ in range(g.group_size)]
        loss, figures = self.update(trainer, prompt_ids, [c.ids for c in completions], rewards)
        (loss * scale).backward()
        self._records.append(
            {
                **self._rollout_record(completions, per_source, rewards),
                **figures,
                "rollout_s": sampled - began,
                "reward_s": scored - sampled,
                "update_s": time.perf_counter() - scored,
            }
        )
        return loss.detach()

    def update(
        self,
        trainer: Trainer,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        rewards: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """GRPO: advantages within each prompt's group, then the clipped ratio loss."""
        g = self.grpo
        advantages = group_advantages(rewards, g.group_size, g.scale_rewards)
        out = self.policy_loss(trainer, prompt_ids, completion_ids, advantages)
        return out.loss, {"kl": out.kl, "clip_fraction": out.clip_fraction}

    def _rollout_record(
        self, completions: list[Completion], per_source: torch.Tensor, rewards: torch.Tensor
    ) -> dict[str, float]:
        """What the metrics show of one micro-step's samples and their rewards."""
        lengths = torch.tensor([len(c.ids) for c in completions], dtype=torch.float32)
        record = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "completion_tokens": lengths.mean().item(),
            "stopped_fraction": sum(c.stopped for c in completions) / len(completions),
            "rollout_tokens": lengths.sum().item(),
        }
        for name, column in zip(self.rewards.names, per_source.T, strict=True):
            record[f"reward_{name}"] = column.mean().item()
            record[f"reward_{name}_std"] = column.std().item() if len(column) > 1 else 0.0
        return record

    # -- validation and metrics ---------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> float:
        """Minus the mean reward of greedy answers to the validation prompts (a loss: lower is
        better); the reward and its standard error go to the metrics."""
        val: list[Prompt] = trainer.val[0]
        completions = self.sample(val, [0] * len(val), greedy=True)
        per_source, rewards = self.score(val, completions)
        n = len(val)
        mean = rewards.mean().item()
        stderr = rewards.std().item() / math.sqrt(n) if n > 1 else 0.0
        self._val = {"val_reward": mean, "val_reward_stderr": stderr}
        for name, column in zip(self.rewards.names, per_source.T, strict=True):
            self._val[f"val_reward_{name}"] = column.mean().item()
        return -mean

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """The means of the micro-steps' figures since the last record (times and sampled
        tokens summed: rollout tokens/s over all of them), averaged over data-parallel ranks,
        and the last validation's rewards."""
        record: dict[str, float] = {}
        if self._records:
            for key in self._records[0]:
                values = [r[key] for r in self._records]
                summed = key.endswith("_s") or key == "rollout_tokens"
                record[key] = sum(values) if summed else sum(values) / len(values)
            self._records = []
            if trainer.distributed:  # every rank's samples: means of the ranks' figures
                keys = sorted(record)
                stats = torch.tensor([record[k] for k in keys], device=trainer.device)
                stats = distributed.all_reduce(stats) / trainer.dims.dp
                record = dict(zip(keys, stats.tolist(), strict=True))
                record["rollout_tokens"] *= trainer.dims.dp  # (all of them)
            record["rollout_tokens_per_s"] = record.pop("rollout_tokens") / max(
                record["rollout_s"], 1e-9
            )
        record.update(self._val)
        self._val = {}
        return record

    def finish(self, trainer: Trainer, result: TrainResult) -> None:
        super().finish(trainer, result)
        self._rewards_scratch.cleanup()


class PPOFinetuning(OnlineFinetuning):
    """PPO with a value head on the policy's last hidden states (one trunk, one optimizer):
    per-token rewards (the score at the last token, a KL penalty on each), GAE, and the
    clipped policy and value losses; one update per rollout."""

    def __init__(self, ft: FinetuneConfig) -> None:
        super().__init__(ft)
        self.ppo = ft.ppo
        self._values: torch.Tensor | None = None

    def adapt(self, part: torch.nn.Module) -> None:
        """The value head joins the policy before it is sharded: a parameter of the model,
        trained, sharded, checkpointed and resumed with it (never exported: the adapter and
        the sampling copy hold the language model only)."""
        super().adapt(part)
        assert isinstance(part, Transformer)
        assert part.norm is not None
        device = part.norm.weight.device
        part.value_head = torch.nn.Linear(part.cfg.dim, 1, bias=False, device=device)

    def fresh_parameters(self, base: ModelConfig) -> frozenset[str]:
        return super().fresh_parameters(base) | {VALUE_HEAD}

    def init_fresh(self, trainer: Trainer, name: str, tensor: torch.Tensor) -> None:
        if name == VALUE_HEAD:
            tensor.zero_()  # values start at 0
        else:
            super().init_fresh(trainer, name, tensor)

    def build_model(self, trainer: Trainer, mesh: DeviceMesh | None) -> ParallelModel:
        model = super().build_model(trainer, mesh)
        policy = model.parts[0]

        def keep(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
            """Values of every position, inside the policy's training forward (where a sharded
            head is gathered); not in the reference's or the sampler's."""
            if torch.is_grad_enabled():
                self._values = policy.value_head(output).float()[..., 0]

        assert policy.norm is not None
        policy.norm.register_forward_hook(keep)
        return model

    def values(self, index: torch.Tensor) -> torch.Tensor:
        """The value head's outputs of the last policy forward, at `index`."""
        assert self._values is not None
        values, self._values = self._values.gather(1, index), None
        return values

    def update(
        self,
        trainer: Trainer,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        rewards: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO's loss of scored completions (one update per rollout: the sampling policy's
        log-probabilities and values are this forward's, detached)."""
        p = self.ppo
        logps, ref_logps, mask, index = self.completion_logps(
            trainer, prompt_ids, completion_ids, self.ft.kl_to_reference
        )
        values = self.values(index)
        old_logps, old_values = logps.detach(), values.detach()
        per_token = token_rewards(rewards.to(logps.device), old_logps, ref_logps, mask, p.kl_coef)
        advantages, returns = gae(per_token, old_values, mask.float(), p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = whiten(advantages, mask)
        out = ppo_loss(
            *(logps, old_logps, values, old_values, advantages, returns, mask),
            *(self.grpo.clip, p.value_clip, p.value_coef),
        )
        figures = {
            "kl": kl_estimate(old_logps, ref_logps, mask),
            "policy_loss": out.policy_loss,
            "value_loss": out.value_loss,
            "clip_fraction": out.clip_fraction,
            "value_clip_fraction": out.value_clip_fraction,
        }
        return out.loss, figures


def align_trainer(ft: FinetuneConfig) -> Trainer:
    """The shared trainer, configured by the GRPO or PPO task of `ft`."""
    online = PPOFinetuning(ft) if ft.finetune.method == "ppo" else OnlineFinetuning(ft)
    return Trainer(online.config, online.task())


def align(ft: FinetuneConfig) -> TrainResult:
    return align_trainer(ft).run()


def trainer_for(ft: FinetuneConfig) -> Callable[[FinetuneConfig], TrainResult]:
    """Fine-tuning's trainer, or this feature's for the methods that sample online."""
    return align if ft.finetune.method in ONLINE_METHODS else finetune
