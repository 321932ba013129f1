"""`loom finetune`: the pretraining trainer, started from a released model, on JSONL data.

What differs from pretraining is decided here and nowhere else: the data (rendered chat rows,
loss on replies only, packed without cross-attention), the weights (loaded from the base after
the parallel layout is built, LoRA adapters added before it, NF4 base weights for QLoRA), the
checkpoint (only the trainable weights when adapters train), the loss (DPO against a frozen
reference, Bradley–Terry for a reward model's score head) and the output (`<run_dir>/adapter/`
in PEFT's layout). Layouts, resume, restarts, guards, metrics and checkpoints are the shared
trainer's.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import tomli_w
import torch
from tokenizers import Tokenizer
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from loom.core import distributed
from loom.core.config import Config, config_to_dict
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import (
    apply_lora,
    base_weight_bytes,
    init_lora_parameter_,
    merge_lora,
    quantize_base_nf4,
)
from loom.core.loss import cross_entropy
from loom.core.run_files import RunFiles
from loom.core.tokenizer import load_tokenizer, tokenizer_hash
from loom.finetune.adapter import save_adapter
from loom.finetune.config import ONLINE_METHODS, FinetuneConfig, training_config
from loom.finetune.distill import Distillation
from loom.finetune.dpo import Preference
from loom.finetune.pairs import PairObjective
from loom.finetune.reward import RewardModeling
from loom.finetune.rows import RowLoader, validation_batches
from loom.finetune.sft_data import build_preferences, build_sft
from loom.models.convert import copy_tokenizer_files
from loom.models.llama import ModelConfig, init_parameter_
from loom.models.sources import describe, load_model
from loom.parallel.parallelize import ParallelModel, parallelize, set_whole_parameter
from loom.parallel.recompute import clean_name
from loom.train.metrics import MetricsWriter
from loom.train.task import TaskData, TrainTask, backpropagate, dense_flops_per_token
from loom.train.trainer import Trainer, TrainResult


class Finetuning:
    """A fine-tuning run's own state beside the trainer (the base model, its scratch folder,
    the data report) and the hooks of its task."""

    def __init__(self, ft: FinetuneConfig) -> None:
        self.ft = ft
        self.method = ft.finetune.method
        self.base_path = Path(ft.model.path).resolve()
        self._scratch = tempfile.TemporaryDirectory(prefix="loom-base-")
        base_cfg, self.base_tokenizer_dir = describe(self.base_path, Path(self._scratch.name))
        self.config: Config = training_config(ft, self._architecture(base_cfg))
        self.dpo = Preference(ft.dpo.beta) if self.method == "dpo" else None
        self.pairs: PairObjective | None = self.dpo
        self.reference: ParallelModel | None = None  # a frozen base (None: adapters off)
        if self.method == "reward":
            self.pairs = RewardModeling(ft.reward.center_rewards_coefficient)
        self.distill: Distillation | None = None
        if self.method == "distill":
            d = ft.distill
            teacher = Path(d.teacher).resolve()
            scratch = Path(self._scratch.name) / "teacher"
            self.distill = Distillation(teacher, d.temperature, d.alpha, scratch)

    def _architecture(self, base: ModelConfig) -> ModelConfig:
        """The base's architecture; a reward model's has a one-output score head (new unless
        the base is a reward model already)."""
        if self.method == "reward":
            if base.num_labels > 1:
                raise LoomError(
                    f"model.path {self.base_path} is a classifier of {base.num_labels} labels; a "
                    "reward model has one score: start from a language model or a reward model"
                )
            return replace(base, num_labels=1, tie_embeddings=False)
        if base.num_labels:
            raise LoomError(
                f"model.path {self.base_path} is a reward or value model (num_labels="
                f"{base.num_labels}), not a language model: fine-tune it with "
                "finetune.method=reward, or start from a language model"
            )
        return base

    def task(self) -> TrainTask:
        """SFT, LoRA and QLoRA train on the model's own loss; DPO and reward models on
        preference pairs."""
        task = TrainTask(
            open_data=self.open_data,
            build_model=self.build_model,
            micro_step=self.micro_step,
            evaluate=self.evaluate,
            flops_per_token=self.flops_per_token,
            checkpoint_state=self.checkpoint_state,
            check_resume=self.check_resume,
            save_config=self.save_config,
            start=self.start,
            finish=self.finish,
            planner_strategy=self.planner_strategy(),
            trainable_only=self.ft.uses_lora,
        )
        objective = self.pairs or self.distill
        if objective is not None:
            task.micro_step, task.evaluate = objective.micro_step, objective.evaluate
            task.metrics = objective.metrics
        return task

    # -- data ---------------------------------------------------------------------------------

    def base_tokenizer(self, cfg: Config) -> tuple[Tokenizer, Path]:
        """The base model's tokenizer, and a folder of its files alone (an HF folder also holds
        weights: only the tokenizer files travel to <run_dir>/tokenizer)."""
        tokenizer_file = self.base_tokenizer_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise LoomError(f"{self.base_path} has no tokenizer.json; fine-tuning needs one")
        tokenizer = load_tokenizer(tokenizer_file)
        if tokenizer.get_vocab_size() > cfg.model.vocab_size:
            raise LoomError(
                f"the tokenizer of {self.base_path} has {tokenizer.get_vocab_size()} tokens, more "
                f"than the model's {cfg.model.vocab_size}"
            )
        tokenizer_dir = Path(self._scratch.name) / "tokenizer"
        copy_tokenizer_files(self.base_tokenizer_dir, tokenizer_dir)
        return tokenizer, tokenizer_dir

    def open_data(self, cfg: Config) -> TaskData:
        ft, t = self.ft, cfg.train
        tokenizer, tokenizer_dir = self.base_tokenizer(cfg)
        d = ft.data
        options: dict[str, Any] = {
            "template": d.template,
            "overlong": d.overlong,
            "val_fraction": d.val_fraction,
            "val_path": d.val_path or None,
            "seed": t.seed,
        }
        if self.pairs is not None:
            # (a reward model scores the whole sequence, its last token too: seq_len tokens)
            width = t.seq_len - 1 if self.method == "reward" else t.seq_len
            data: Any = build_preferences(d.path, tokenizer_dir, width, **options)
        else:
            data = build_sft(d.path, tokenizer_dir, t.seq_len, packing=d.packing, **options)
        self.report = data.report
        loader = RowLoader(data.train, t.seq_len, t.seed)
        val = [data.val] if len(data.val) else []
        if not val:
            logger.warning("no validation examples (data.val_fraction=0, no data.val_path)")
        identity = [fingerprint(d, t.seed)]
        return TaskData(loader, val, identity, tokenizer_hash(tokenizer), tokenizer_dir)

    def planner_strategy(self) -> dict[str, object]:
        if not self.ft.uses_lora:
            return {}
        kind = "qlora" if self.method == "qlora" else "lora"
        return {"finetune": kind, "lora_rank": self.ft.lora.rank}

    def flops_per_token(self, trainer: Trainer) -> float:
        """LoRA / QLoRA (and GRPO's or PPO's adapters): the frozen base's backward skips its weight
        gradients (4·N), the adapters train in full (6 per parameter). DPO and full fine-tuning
        count as pretraining (online methods' sampling is not counted); distillation adds the
        teacher's forward pass."""
        online = self.method in ONLINE_METHODS
        adapters = self.method in ("lora", "qlora") or (online and self.ft.uses_lora)
        if self.distill is not None and self.distill.teacher is not None:
            teacher = self.distill.teacher.cfg.flops_per_token(trainer.cfg.train.seq_len) / 3
            return dense_flops_per_token(trainer) + teacher
        if not adapters:
            return dense_flops_per_token(trainer)
        adapters = sum(
            p.numel() for part in trainer.model.parts for p in part.parameters() if p.requires_grad
        )
        cfg = trainer.cfg
        return cfg.model.flops_per_token(cfg.train.seq_len, frozen=True) + 6 * adapters

    def save_config(self, cfg: Config, run_dir: Path) -> None:
        files = RunFiles(run_dir)
        files.config.write_text(tomli_w.dumps(config_to_dict(self.ft)))
        files.data_report.write_text(json.dumps(self.report.to_dict(), indent=2))

    # -- model --------------------------------------------------------------------------------

    def build_model(self, trainer: Trainer, mesh: DeviceMesh | None) -> ParallelModel:
        ft, seed = self.ft, trainer.cfg.train.seed

        def init(name: str, tensor: torch.Tensor) -> None:
            if not init_lora_parameter_(name, tensor, seed) and name in fresh:
                self.init_fresh(trainer, name, tensor)
            # (the base's weights are loaded next)

        qlora = self.method == "qlora"
        if qlora and trainer.dims.world_size > 1:
            raise LoomError(
                "finetune.method=qlora runs in one process (NF4 weights are not sharded "
                "yet); launch without --nproc, or use finetune.method=lora"
            )
        base, _ = load_model(self.base_path, torch.float32, Path(self._scratch.name))
        merge_lora(base)  # a LoRA run as the base: its adapters are part of the base now
        weights = base.state_dict()
        fresh = self.fresh_parameters(base.cfg)
        for name in fresh:
            weights.pop(name, None)
        # QLoRA: the fp32 copy stays in host memory; only NF4 weights reach the device.
        model = _parallel_copy(trainer, mesh, weights, self.adapt, init, on_host=qlora, fresh=fresh)
        if ft.needs_reference:
            self.reference = _parallel_copy(trainer, mesh, weights, None, init)
            for part in self.reference.parts:
                part.requires_grad_(False)
            if self.dpo is not None:
                self.dpo.reference = self.reference
        del base, weights
        if self.distill is not None:
            self.distill.load_teacher(trainer, trainer.cfg.model.vocab_size)
        if qlora:
            count = sum(quantize_base_nf4(part, trainer.device) for part in model.parts)
            logger.info("QLoRA: %d projections stored as NF4 on %s", count, trainer.device)
        self._log_parameters(trainer, model)
        return model

    def adapt(self, part: torch.nn.Module) -> None:
        """What this method adds to each model part before parallelism (on the meta device):
        LoRA's adapters."""
        if self.ft.uses_lora:
            apply_lora(part, self.ft.lora)

    def fresh_parameters(self, base: ModelConfig) -> frozenset[str]:
        """Parameters the base does not give (initialised by `init_fresh`): a reward model's
        score head where the base has a language-model head."""
        if self.method == "reward" and not base.num_labels:
            return frozenset({"lm_head.weight"})
        return frozenset()

    def init_fresh(self, trainer: Trainer, name: str, tensor: torch.Tensor) -> None:
        init_parameter_(trainer.cfg.model, name, tensor, trainer.cfg.train.seed)

    def _log_parameters(self, trainer: Trainer, model: ParallelModel) -> None:
        parts = model.parts
        total = trainer.cfg.model.num_params()
        trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
        base_bytes = sum(base_weight_bytes(part) for part in parts)
        logger.info(
            "%s fine-tuning of %s: %.2fM parameters, %.2fM trainable (%.2f%%); base weights "
            "%.1f MiB (%.2f bytes/parameter)",
            self.method,
            self.base_path,
            total / 1e6,
            trainable / 1e6,
            100 * trainable / total,
            base_bytes / 2**20,
            base_bytes / total,
        )

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "finetune": {
                "method": self.method,
                "base": str(self.base_path),
                "lora": asdict(self.ft.lora) if self.ft.uses_lora else None,
            }
        }

    def check_resume(self, state: dict[str, Any], run_dir: Path) -> None:
        saved, current = state.get("finetune"), self.checkpoint_state()["finetune"]
        if saved != current:
            raise LoomError(
                f"run_dir {run_dir} holds a fine-tuning checkpoint of {saved}, but the config "
                f"asks for {current}; restore model.path, finetune.method and [lora], or use a "
                "new run_dir"
            )

    # -- steps and evaluation -----------------------------------------------------------------

    def micro_step(
        self, trainer: Trainer, batch: list[torch.Tensor], scale: float
    ) -> torch.Tensor | None:
        """The mean over the trained targets of the whole global micro-batch, whatever their
        split over data-parallel ranks: each rank's mean is weighted by its share."""
        loader = trainer.loader
        assert isinstance(loader, RowLoader)
        weight = loader.share_trained * trainer.dims.dp / loader.global_trained
        loss = backpropagate(trainer, batch, scale * weight)
        return None if loss is None else loss * weight

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> float:
        """The loss over the whole validation set, weighted by trained tokens."""
        totals = torch.zeros(2, device=trainer.device)  # loss sum, trained targets
        for tensors, real in validation_batches(trainer, trainer.val[0]):
            inputs, targets, *doc_ids = tensors
            targets[~real.to(trainer.device)] = -100
            count = (targets != -100).sum()
            loss = trainer.model.eval_loss(inputs, targets, *doc_ids)  # every rank, in step
            if count == 0:
                continue
            assert loss is not None
            totals[0] += loss.float() * count
            totals[1] += count
        if trainer.distributed:
            totals = distributed.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    # -- before and after ---------------------------------------------------------------------

    def start(self, trainer: Trainer, result: TrainResult) -> None:
        """The validation loss before any update, recorded as step 0 (what fine-tuning is
        measured against)."""
        if trainer.step != 0 or not trainer.val:
            return
        loss = trainer.evaluate()
        record: dict[str, float] = {"step": 0, "val_loss": loss, **trainer.task.metrics(trainer)}
        if trainer.rank == 0:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            writer = MetricsWriter(trainer.run_dir, trainer.cfg.metrics.tensorboard, 0)
            writer.write(record)
            writer.close()
        logger.info("validation loss before fine-tuning: %.4f", loss)
        result.val_losses[0] = loss

    def finish(self, trainer: Trainer, result: TrainResult) -> None:
        if self.ft.uses_lora and result.stopped_by is None:
            self._export_adapter(trainer)
        self._scratch.cleanup()

    def _export_adapter(self, trainer: Trainer) -> None:
        """`<run_dir>/adapter/`: the full (unsharded) adapter tensors in PEFT's layout."""
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        weights = get_model_state_dict(trainer.model.parts[0], options=options)
        if trainer.rank == 0:
            folder = save_adapter(
                trainer.run_dir / "adapter",
                {clean_name(k): v for k, v in weights.items() if ".lora_" in k},
                self.ft.lora,
                str(self.base_path),
            )
            logger.info("adapter written in PEFT's layout: %s", folder)


def _parallel_copy(
    trainer: Trainer,
    mesh: DeviceMesh | None,
    weights: dict[str, torch.Tensor],
    adapt: Any,
    init: Any,
    on_host: bool = False,
    fresh: frozenset[str] = frozenset(),
) -> ParallelModel:
    """The model in this run's layout, holding the base weights (sliced to the shards) except
    the `fresh` parameters, which keep the values `init` gave them."""
    model = parallelize(
        trainer.cfg, trainer.dims, mesh, trainer.device, cross_entropy, adapt, init, on_host
    )
    for part in model.parts:
        for name, param in part.named_parameters():
            name = clean_name(name)
            if ".lora_" not in name and name not in fresh:
                set_whole_parameter(param, name, lambda n, t: t.copy_(weights[n]))
    return model


def fingerprint(d: Any, seed: int) -> str:
    """The data files' bytes and the settings that decide the rows (a resumed run must get the
    same rows)."""
    digest = hashlib.sha256()
    for path in (d.path, d.val_path):
        if path:
            digest.update(Path(path).read_bytes())
    settings = [d.val_fraction, d.template, d.overlong, d.packing, seed]
    digest.update(json.dumps(settings).encode())
    return f"jsonl:{digest.hexdigest()[:16]}"


def finetune_trainer(ft: FinetuneConfig) -> Trainer:
    """The shared trainer, configured by the fine-tuning (or DPO) task of `ft`."""
    finetuning = Finetuning(ft)
    return Trainer(finetuning.config, finetuning.task())


def finetune(cfg: FinetuneConfig) -> TrainResult:
    return finetune_trainer(cfg).run()
