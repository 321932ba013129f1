"""The single-process trainer: exact resume, run-folder contract, learning, and bad input."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loom.config import Config, OptimizerConfig, load_config
from loom.data.tokenize import TokenizeOptions, tokenize_to_shards
from loom.data.tokenizer import save_tokenizer, train_bpe
from loom.errors import LoomError
from loom.train.checkpoint import Checkpointer
from loom.train.metrics import read_metrics
from loom.train.optim import lr_multiplier
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
    a = Trainer(
        tiny_config(*common, "--train.steps=20", run_dir=tmp_path / "straight")
    ).model.state_dict()
    b = Trainer(tiny_config(*common, "--train.steps=20", run_dir=split_dir)).model.state_dict()
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
        full.model.named_parameters(), accumulated.model.parameters(), strict=True
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
    assert "layers.0.self_attn.q_proj.weight" in compiled_trainer.model.state_dict()


def test_mfu_is_model_flops_over_peak(
    tiny_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the cached CPU peak set to a known figure, mfu = flops/token · tokens/s / peak."""
    from loom.planner.hardware import cpu_matmul_flops

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    measured = cpu_matmul_flops(torch.float32)  # really measures, then caches
    assert measured > 1e9
    cache_file = tmp_path / "cache" / "cpu_peak.json"
    cache = json.loads(cache_file.read_text())
    cache = {key: 2.5e10 for key in cache}
    cache_file.write_text(json.dumps(cache))
    cfg = tiny_config("--train.steps=2")
    train(cfg)
    for r in read_metrics(Path(cfg.run_dir)):
        assert r["mfu"] == pytest.approx(cfg.model.flops_per_token(32) * r["tokens_per_s"] / 2.5e10)


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


def test_damaged_checkpoint_is_reported_clearly(tiny_config: MakeConfig, tmp_path: Path) -> None:
    train(tiny_config("--train.steps=4"))
    data_file = next((tmp_path / "run" / "checkpoints" / "step-4").glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated on disk
    with pytest.raises(LoomError, match=r"checkpoint .*step-4 could not be loaded"):
        Trainer(tiny_config("--train.steps=8"))
