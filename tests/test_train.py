"""The single-process trainer: exact resume, run-folder contract, learning, and bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loom.core.checkpoint import Checkpointer
from loom.core.config import Config, OptimizerConfig, load_config
from loom.core.errors import LoomError
from loom.core.tokenizer import save_tokenizer, train_bpe
from loom.data.tokenize import TokenizeOptions, tokenize_to_shards
from loom.train.metrics import read_metrics
from loom.train.optim import lr_multiplier
from loom.train.task import TrainTask, pretraining
from loom.train.trainer import Trainer, train

MakeConfig = Callable[..., Config]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_resume_is_bit_exact(tiny_config: MakeConfig, tmp_path: Path) -> None:
    """20 steps straight == 10 steps, a new process-equivalent start, then 10 more."""
    common = [
        "--optimizer.decay_steps=20",
        "--checkpoint.interval=10",
        "--train.micro_batch_size=2",
    ]
    straight = train(tiny_config(*common, "--train.steps=20", run_dir=tmp_path / "straight"))
    split_dir = tmp_path / "split"
    train(tiny_config(*common, "--train.steps=10", run_dir=split_dir))
    assert (split_dir / "checkpoints" / "latest").resolve().name == "step-10"
    resumed_trainer = Trainer(tiny_config(*common, "--train.steps=20", run_dir=split_dir))
    assert resumed_trainer.step == 10
    resumed = resumed_trainer.run()

    expected = losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 21))
    assert losses(split_dir) == expected  # every step once, bit-identical floats
    assert resumed.train_losses == {s: v for s, v in straight.train_losses.items() if s > 10}
    a = (
        Trainer(tiny_config(*common, "--train.steps=20", run_dir=tmp_path / "straight"))
        .model.parts[0]
        .state_dict()
    )
    b = Trainer(tiny_config(*common, "--train.steps=20", run_dir=split_dir))
    b = b.model.parts[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_the_same_command_after_a_crash_is_bit_exact(
    tiny_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 20-step run dies right after its step-10 checkpoint; the unchanged config resumes it."""
    args = ["--train.steps=20", "--checkpoint.interval=10"]
    straight = train(tiny_config(*args, run_dir=tmp_path / "straight"))

    class Crash(Exception):
        """Stands for the process dying."""

    original_save = Trainer.save_checkpoint

    def save_then_crash(self: Trainer) -> Path:
        path = original_save(self)
        if self.step == 10:
            raise Crash
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(tiny_config(*args, run_dir=tmp_path / "crashed"))
    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    resumed = train(tiny_config(*args, run_dir=tmp_path / "crashed"))
    assert min(resumed.train_losses) == 11
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    assert resumed.train_losses == {s: v for s, v in straight.train_losses.items() if s > 10}


def test_run_folder_contract(tiny_config: MakeConfig, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = tiny_config(
        "--train.steps=8",
        "--checkpoint.interval=2",
        "--checkpoint.keep=2",
        "--train.eval_interval=4",
    )
    train(cfg)
    assert load_config(run / "config.toml").train.steps == 8  # resolved config reloads
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_mem_gib"} <= set(r)
        assert (
            math.isfinite(r["loss"])
            and r["tokens_per_s"] > 0
            and r["mfu"] > 0
            and r["peak_mem_gib"] > 0
        )
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tb_loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert tb_loss == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert [e.step for e in events.Scalars("val/val_loss")] == [4, 8]
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-6", "step-8"]  # pruned to checkpoint.keep
    assert (run / "checkpoints" / "latest").resolve().name == "step-8"
    state = json.loads((run / "checkpoints" / "step-8" / "trainer.json").read_text())
    assert state["step"] == 8 and sum(state["loader"]["cursor"]) + sum(state["loader"]["epoch"]) > 0
    assert (run / "tokenizer" / "tokenizer.json").is_file()


def test_logged_lr_follows_warmup_and_cosine(tiny_config: MakeConfig) -> None:
    cfg = tiny_config(
        "--train.steps=12", "--optimizer.warmup_steps=3", "--optimizer.min_lr_ratio=0.1"
    )
    train(cfg)
    logged = [r["lr"] for r in read_metrics(Path(cfg.run_dir))]
    peak = cfg.optimizer.lr
    assert logged[:3] == pytest.approx([peak / 4, peak / 2, 3 * peak / 4])  # linear warm-up
    assert logged[3] == pytest.approx(peak)
    assert all(a > b for a, b in itertools.pairwise(logged[3:]))  # cosine decay
    # After the last step the schedule reaches lr · min_lr_ratio.
    assert lr_multiplier(12, cfg.optimizer, 12) == pytest.approx(0.1)
    half = OptimizerConfig(warmup_steps=0, min_lr_ratio=0.0)
    assert lr_multiplier(50, half, 100) == pytest.approx(0.5)


def test_training_reduces_validation_loss(tiny_config: MakeConfig) -> None:
    result = train(
        tiny_config(
            "--train.steps=60",
            "--train.eval_interval=20",
            "--checkpoint.interval=60",
            "--train.batch_size=8",
            "--train.seq_len=64",
            "--optimizer.lr=1e-2",
            "--optimizer.warmup_steps=5",
        )
    )
    first_loss = result.train_losses[1]
    assert (
        abs(first_loss - math.log(512)) < 0.3
    )  # a fresh model is near-uniform over the vocabulary
    val = result.val_losses
    assert sorted(val) == [20, 40, 60]
    assert val[20] > val[40] > val[60] and val[60] < val[20] - 0.1 and val[60] < first_loss - 0.8


def test_gradient_accumulation_equals_full_batch(tiny_config: MakeConfig, tmp_path: Path) -> None:
    full = Trainer(tiny_config("--train.micro_batch_size=4", run_dir=tmp_path / "a"))
    accumulated = Trainer(tiny_config("--train.micro_batch_size=1", run_dir=tmp_path / "b"))
    torch.testing.assert_close(
        full.forward_backward(), accumulated.forward_backward(), atol=1e-6, rtol=1e-6
    )
    for (name, p), q in zip(
        full.model.parts[0].named_parameters(), accumulated.model.parts[0].parameters(), strict=True
    ):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-4, msg=name)


def test_bf16_autocast_tracks_fp32(tiny_config: MakeConfig, tmp_path: Path) -> None:
    fp32 = train(tiny_config("--train.steps=3", run_dir=tmp_path / "fp32"))
    bf16 = train(
        tiny_config("--train.steps=3", "--train.precision=bf16", run_dir=tmp_path / "bf16")
    )
    for step in (1, 2, 3):
        assert bf16.train_losses[step] != fp32.train_losses[step]  # autocast really is on
        assert bf16.train_losses[step] == pytest.approx(fp32.train_losses[step], abs=0.05)


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_config: MakeConfig, tmp_path: Path) -> None:
    from torch._dynamo.utils import counters

    eager = train(tiny_config("--train.steps=3", run_dir=tmp_path / "eager"))
    counters.clear()
    compiled_trainer = Trainer(
        tiny_config("--train.steps=3", "--train.compile=true", run_dir=tmp_path / "c")
    )
    compiled = compiled_trainer.run()
    assert counters["stats"]["unique_graphs"] >= 1  # the forward + loss really went through dynamo
    for step in (1, 2, 3):
        assert compiled.train_losses[step] == pytest.approx(eager.train_losses[step], rel=1e-4)
    # The model itself is not wrapped, so checkpoints stay interchangeable with eager runs.
    assert "layers.0.self_attn.q_proj.weight" in compiled_trainer.model.parts[0].state_dict()


def test_mfu_is_model_flops_over_peak(
    tiny_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cached CPU peak set to a known figure (above what 2 cores reach: a peak below a
    real step's rate is lifted to it), mfu = flops/token · tokens/s / peak."""
    from loom.planner.hardware import cpu_matmul_flops

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    measured = cpu_matmul_flops(torch.float32)  # really measures, then caches
    assert measured > 1e9
    cache_file = tmp_path / "cache" / "cpu_peak.json"
    cache = json.loads(cache_file.read_text())
    cache = {key: 5e12 for key in cache}
    cache_file.write_text(json.dumps(cache))
    cfg = tiny_config("--train.steps=2")
    train(cfg)
    for r in read_metrics(Path(cfg.run_dir)):
        assert r["mfu"] == pytest.approx(cfg.model.flops_per_token(32) * r["tokens_per_s"] / 5e12)


# -- bad input --------------------------------------------------------------------------------


def test_tokenizer_larger_than_model_is_refused_before_any_write(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    with pytest.raises(
        LoomError,
        match="has 512 tokens but model.vocab_size=256; set model.vocab_size to at least 512",
    ):
        Trainer(tiny_config("--model.vocab_size=256"))
    assert not (tmp_path / "run").exists()


def test_run_folder_of_another_model_is_never_overwritten(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    train(tiny_config("--train.steps=4"))
    run = tmp_path / "run"

    def fingerprint() -> dict[str, str]:
        return {
            str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*"))
            if p.is_file()
        }

    before = fingerprint()
    with pytest.raises(
        LoomError, match=r"different model \(model.n_layers: checkpoint 2 vs config 3\)"
    ):
        Trainer(tiny_config("--train.steps=8", "--model.n_layers=3"))
    assert fingerprint() == before


def test_resume_with_another_sequence_length_is_refused_before_any_write(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    train(tiny_config("--train.steps=2"))
    config_before = (tmp_path / "run" / "config.toml").read_text()
    with pytest.raises(LoomError, match="trained with train.seq_len=32"):
        Trainer(tiny_config("--train.steps=4", "--train.seq_len=64"))
    assert (tmp_path / "run" / "config.toml").read_text() == config_before


def test_data_with_another_tokenizer_is_refused(
    tiny_config: MakeConfig, tmp_path: Path, corpus_dir: Path
) -> None:
    train(tiny_config("--train.steps=2"))
    other_tok = tmp_path / "tok300"
    save_tokenizer(
        train_bpe([p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:5]], 300), other_tok
    )
    other_data = tmp_path / "other"
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{corpus_dir}/*.py"], tokenizer=str(other_tok), out=str(other_data)
        )
    )
    with pytest.raises(LoomError, match="trained with another tokenizer"):
        Trainer(tiny_config("--train.steps=4", f"--data.path={other_data}"))


def test_missing_settings_and_empty_data(tiny_config: MakeConfig, tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="run_dir is not set"):
        Trainer(tiny_config("--run_dir="))
    with pytest.raises(LoomError, match="data.path is not set"):
        Trainer(tiny_config("--data.path="))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoomError, match="holds no token shards"):
        Trainer(tiny_config(f"--data.path={tmp_path / 'empty'}"))


def test_data_shorter_than_one_sequence(
    tiny_config: MakeConfig, tmp_path: Path, tokenizer_dir: Path
) -> None:
    (tmp_path / "short.txt").write_text("just a few words")
    short = tmp_path / "short"
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[str(tmp_path / "short.txt")],
            tokenizer=str(tokenizer_dir),
            out=str(short),
            val_fraction=0,
        )
    )
    with pytest.raises(LoomError, match="fewer than one sequence of train.seq_len=32"):
        Trainer(tiny_config(f"--data.path={short}"))


def test_latest_link_lost_falls_back_to_newest_complete(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    train(tiny_config("--train.steps=8"))
    ckpt = Checkpointer(tmp_path / "run", keep=3)
    (ckpt.dir / "latest").unlink()
    (ckpt.dir / "step-8" / "trainer.json").unlink()  # step 8 incomplete
    assert ckpt.latest() == ckpt.dir / "step-4"


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    train(tiny_config("--train.steps=8", "--checkpoint.interval=4"))
    data_file = next((tmp_path / "run" / "checkpoints" / "step-8").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated on disk
    trainer = Trainer(tiny_config("--train.steps=12", "--checkpoint.interval=4"))
    assert trainer.resume_from == tmp_path / "run" / "checkpoints" / "step-4"
    assert trainer.step == 4


def test_no_usable_checkpoint_is_reported_clearly(tiny_config: MakeConfig, tmp_path: Path) -> None:
    train(tiny_config("--train.steps=4"))
    data_file = next((tmp_path / "run" / "checkpoints" / "step-4").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(LoomError, match=r"no usable checkpoint \(step-4: .*distcp is truncated"):
        Trainer(tiny_config("--train.steps=8"))


# -- found in review: resume semantics ------------------------------------------------------


def test_extending_a_run_follows_the_new_schedule_from_the_first_step(
    tiny_config: MakeConfig,
) -> None:
    train(tiny_config("--train.steps=10", "--checkpoint.interval=10"))
    cfg = tiny_config("--train.steps=20", "--checkpoint.interval=10")
    train(cfg)
    logged = {r["step"]: r["lr"] for r in read_metrics(Path(cfg.run_dir))}
    for step in range(11, 21):  # lr used by step s is the multiplier after s-1 optimizer steps
        assert logged[step] == pytest.approx(
            cfg.optimizer.lr * lr_multiplier(step - 1, cfg.optimizer, 20)
        )


def test_resume_applies_changed_optimizer_settings(tiny_config: MakeConfig) -> None:
    train(tiny_config("--train.steps=4"))
    trainer = Trainer(
        tiny_config(
            "--train.steps=8",
            "--optimizer.lr=1e-4",
            "--optimizer.weight_decay=0.3",
            "--optimizer.beta1=0.5",
            "--optimizer.eps=1e-6",
        )
    )
    decay, no_decay = trainer.optimizers.optimizers[0].param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.5, 0.95) and decay["eps"] == 1e-6
    assert decay["lr"] == pytest.approx(1e-4 * lr_multiplier(4, trainer.cfg.optimizer, 8))
    assert (
        trainer.optimizers.optimizers[0].state[next(iter(trainer.model.parts[0].parameters()))][
            "step"
        ]
        == 4
    )  # state kept


def test_metrics_logged_after_the_last_checkpoint_are_replaced_on_resume(
    tiny_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--train.steps=16", "--checkpoint.interval=10"]
    train(tiny_config(*args, run_dir=tmp_path / "straight"))

    class Crash(Exception):
        """Stands for the process dying."""

    original = Trainer.train_step

    def step_then_crash(self: Trainer) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.step == 13:  # steps 11-13 are logged, the last checkpoint is step 10
            raise Crash
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_crash)
    with pytest.raises(Crash):
        train(tiny_config(*args, run_dir=tmp_path / "run"))
    monkeypatch.setattr(Trainer, "train_step", original)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 14, "loss": 5.')  # and a line cut short mid-write
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 13
    train(tiny_config(*args, run_dir=tmp_path / "run"))
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    assert len(read_metrics(tmp_path / "run")) == 16


def test_rng_state_is_restored_on_resume(tiny_config: MakeConfig) -> None:
    trainer = Trainer(tiny_config("--train.steps=4"))
    trainer.run()
    torch.manual_seed(12345)  # disturb the global generator
    saved = torch.load(Path(trainer.run_dir) / "checkpoints" / "step-4" / "rng.pt")["cpu"]
    Trainer(tiny_config("--train.steps=8"))
    assert torch.equal(torch.get_rng_state(), saved)


def test_seed_sets_the_data_order(tiny_config: MakeConfig, tmp_path: Path) -> None:
    a = Trainer(tiny_config("--train.seed=1", run_dir=tmp_path / "a")).loader.next_indices(32)
    b = Trainer(tiny_config("--train.seed=2", run_dir=tmp_path / "b")).loader.next_indices(32)
    c = Trainer(tiny_config("--train.seed=1", run_dir=tmp_path / "c")).loader.next_indices(32)
    assert not np.array_equal(a, b) and np.array_equal(a, c)


def test_validation_loss_is_computed_on_the_validation_split(
    tiny_config: MakeConfig, data_dir: Path
) -> None:
    from loom.core.loss import cross_entropy
    from loom.data.shards import TokenDataset

    trainer = Trainer(tiny_config("--train.eval_batches=2"))
    val = TokenDataset(data_dir).split("val")
    windows = torch.stack([torch.from_numpy(val.window(i * 32, 33)) for i in range(8)])  # 2 × 4
    with torch.no_grad():
        expected = cross_entropy(trainer.model.parts[0](windows[:, :-1]), windows[:, 1:]).item()
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-6)


def test_pruning_never_removes_the_new_checkpoint(tiny_config: MakeConfig, tmp_path: Path) -> None:
    train(tiny_config("--train.steps=20", "--checkpoint.interval=5", "--checkpoint.keep=2"))
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "latest").unlink()
    (checkpoints / "latest").symlink_to("step-15")  # rolled back by hand
    train(tiny_config("--train.steps=19", "--checkpoint.interval=3", "--checkpoint.keep=1"))
    assert (checkpoints / "latest").resolve().name == "step-19"
    assert Checkpointer(tmp_path / "run", 1).latest() == checkpoints / "step-19"


def test_incomplete_or_odd_latest_is_refused(tiny_config: MakeConfig, tmp_path: Path) -> None:
    train(tiny_config("--train.steps=4"))
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step-4" / "rng.pt").unlink()
    with pytest.raises(LoomError, match="no usable checkpoint .step-4: rng.pt is missing"):
        Trainer(tiny_config("--train.steps=8"))
    (checkpoints / "latest").unlink()
    (checkpoints / "latest").mkdir()
    with pytest.raises(LoomError, match="should be a link"):
        Trainer(tiny_config("--train.steps=8"))


def test_resuming_on_other_data_is_refused(
    tiny_config: MakeConfig, tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path
) -> None:
    train(tiny_config("--train.steps=2"))
    other = tmp_path / "other"
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{corpus_dir}/a*.py"], tokenizer=str(tokenizer_dir), out=str(other)
        )
    )
    with pytest.raises(LoomError, match="trained on other data"):
        Trainer(tiny_config("--train.steps=4", f"--data.path={other}"))


def test_run_dir_that_is_a_file_is_refused(tiny_config: MakeConfig, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoomError, match="is a file"):
        Trainer(tiny_config(run_dir=tmp_path / "file"))


class SummedLoss:
    """A task of this test's own: the summed (not mean) token loss, a count of the micro-batches
    it saw as an extra metric, and that count carried through checkpoints."""

    def __init__(self) -> None:
        self.micro_batches = 0

    def micro_step(self, trainer: Trainer, batch: list[torch.Tensor], scale: float) -> torch.Tensor:
        inputs, targets = batch
        with trainer.model.autocast:
            logits = trainer.model.parts[0](inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        (loss * scale).backward()
        self.micro_batches += 1
        return loss.detach()

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        return {"micro_batches": self.micro_batches}

    def checkpoint_state(self) -> dict[str, object]:
        return {"summed": {"micro_batches": self.micro_batches}}

    def check_resume(self, state: dict[str, object], run_dir: Path) -> None:
        saved = state.get("summed")
        if not isinstance(saved, dict):
            raise LoomError(f"run_dir {run_dir} was not trained on the summed loss")
        self.micro_batches = saved["micro_batches"]


def test_a_task_extends_the_trainer_without_subclassing(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    import loom.finetune.trainer  # noqa: F401  (fine-tuning configures the same class)

    assert Trainer.__subclasses__() == []
    common = ["--train.micro_batch_size=2", "--checkpoint.interval=3"]
    plain = train(tiny_config(*common, "--train.steps=1", run_dir=tmp_path / "plain"))

    def summed_task(summed: SummedLoss) -> TrainTask:
        return replace(
            pretraining(),
            micro_step=summed.micro_step,
            metrics=summed.metrics,
            checkpoint_state=summed.checkpoint_state,
            check_resume=summed.check_resume,
        )

    run = tmp_path / "summed"
    Trainer(tiny_config(*common, "--train.steps=3", run_dir=run), summed_task(SummedLoss())).run()
    records = read_metrics(run)
    # Same weights and data at step 1: the sum over a micro-batch's 2 × 32 targets = 64 × mean.
    assert records[0]["loss"] == pytest.approx(64 * plain.train_losses[1], rel=1e-5)
    assert [r["micro_batches"] for r in records] == [2, 4, 6]
    state = json.loads((run / "checkpoints" / "step-3" / "trainer.json").read_text())
    assert state["summed"] == {"micro_batches": 6}
    # The task's state comes back on resume, and a run of another task is refused.
    Trainer(tiny_config(*common, "--train.steps=4", run_dir=run), summed_task(SummedLoss())).run()
    assert read_metrics(run)[-1]["micro_batches"] == 8
    with pytest.raises(LoomError, match="not trained on the summed loss"):
        Trainer(
            tiny_config(*common, "--train.steps=5", run_dir=tmp_path / "plain"),
            summed_task(SummedLoss()),
        )


def test_cpu_peak_memory_is_the_process_own_not_a_forking_parents() -> None:
    """A `loom train` started from a large process (a notebook, a test runner) must report its
    own peak: ru_maxrss keeps the parent's resident size at fork across exec."""
    import subprocess
    import sys

    held = bytearray(600 * 2**20)
    held[::4096] = b"\1" * len(range(0, len(held), 4096))  # touch every page: resident
    child = (
        "import torch; from loom.train.metrics import peak_memory_gib as p;"
        "print(p(torch.device('cpu')))"
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 0.5  # torch imported: ~0.2 GiB; the parent holds > 0.6 GiB
    del held
