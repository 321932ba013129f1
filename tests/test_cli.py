"""The `loom` command-line contract, through real processes: success paths, resume, and errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from loom.cli import main
from loom.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_TOML = REPO / "configs" / "tiny.toml"
LOOM = [sys.executable, "-m", "loom"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOOM, *args] if args[0] != "-m" else [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=os.environ.copy(),
        timeout=600,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_end_to_end_and_resume_through_the_cli(tmp_path: Path, corpus_dir: Path) -> None:
    ok(
        run(
            "tokenizer",
            "train",
            "--input",
            f"{corpus_dir}/*.py",
            "--vocab-size",
            "512",
            "--out",
            str(tmp_path / "tok"),
        )
    )
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    ok(
        run(
            "data",
            "tokenize",
            "--input",
            f"{corpus_dir}/*.py",
            "--tokenizer",
            str(tmp_path / "tok"),
            "--out",
            str(tmp_path / "data"),
            "--val-fraction",
            "0.1",
        )
    )
    assert (tmp_path / "data" / "manifest.json").is_file()

    settings = [
        *TINY_MODEL,
        f"--data.path={tmp_path / 'data'}",
        "--train.seq_len=32",
        "--train.batch_size=4",
        "--train.micro_batch_size=2",
        "--train.precision=fp32",
        "--train.eval_interval=3",
        "--optimizer.decay_steps=12",
        "--checkpoint.interval=6",
        "--metrics.log_interval=1",
        "--metrics.tensorboard",
        "false",  # the space-separated override form
    ]
    # Straight 12 steps, launched the way torchrun launches workers.
    ok(
        run(
            "-m",
            "loom.train",
            str(TINY_TOML),
            *settings,
            "--train.steps=12",
            f"--run_dir={tmp_path / 'straight'}",
        )
    )
    # 6 steps, then the same command with 12 steps resumes from the checkpoint at step 6.
    split = tmp_path / "split"
    ok(run("train", str(TINY_TOML), *settings, "--train.steps=6", f"--run_dir={split}"))
    resumed = ok(run("train", str(TINY_TOML), *settings, "--train.steps=12", f"--run_dir={split}"))
    assert "resumed from" in resumed.stderr and "step-6" in resumed.stderr
    straight = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    assert sorted(straight) == list(range(1, 13))
    assert {r["step"]: r["loss"] for r in read_metrics(split)} == straight
    assert not (split / "tb").exists()

    sample = ok(
        run("generate", str(split), "--prompt", "def main(", "--max-tokens", "12", "--seed", "3")
    )
    again = ok(
        run(
            "generate",
            str(split / "checkpoints" / "step-12"),
            "--prompt",
            "def main(",
            "--max-tokens",
            "12",
            "--seed",
            "3",
        )
    )
    assert sample.stdout.startswith("def main(") and len(sample.stdout) > len("def main(")
    assert sample.stdout == again.stdout  # same seed, same checkpoint


def test_bad_input_is_one_error_line_from_a_real_process(tmp_path: Path) -> None:
    proc = run("train", str(tmp_path / "missing.toml"))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: config file {tmp_path / 'missing.toml'} does not exist; "
        "pass the path of a TOML file"
    ]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "{tmp}/broken.toml"], "is not valid TOML"),
        (["train", str(TINY_TOML), "--train.stepz=3"], "did you mean train.steps?"),
        (
            ["train", str(TINY_TOML), "--run_dir={tmp}/r", "--data.path={tmp}"],
            "holds no token shards",
        ),
        (["train", str(TINY_TOML), "--run_dir={tmp}/r"], "data.path is not set"),
        (["train", str(TINY_TOML), "oops"], "must look like --section.key=value"),
        (["generate", "{tmp}/nowhere", "--prompt", "x"], "is neither a Loom run folder"),
        (
            [
                "tokenizer",
                "train",
                "--input",
                "{tmp}/*.none",
                "--vocab-size",
                "300",
                "--out",
                "{tmp}/t",
            ],
            "matches no files",
        ),
        (
            [
                "tokenizer",
                "train",
                "--input",
                "{tmp}/broken.toml",
                "--vocab-size",
                "10",
                "--out",
                "{tmp}/t",
            ],
            "too small",
        ),
        (
            ["data", "tokenize", "--input", "x"],
            "the following arguments are required: --tokenizer, --out",
        ),
        (
            [
                "data",
                "tokenize",
                "--input",
                "{tmp}/broken.toml",
                "--tokenizer",
                "{tmp}",
                "--out",
                "{tmp}/o",
            ],
            "no tokenizer at",
        ),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (
            ["generate", "{tmp}", "--prompt", "x", "--max-tokens", "many"],
            "invalid int value: 'many'",
        ),
        (
            [
                "tokenizer",
                "train",
                "--input",
                "{tmp}/empty.txt",
                "--vocab-size",
                "300",
                "--out",
                "{tmp}/t",
            ],
            "no text to train",
        ),
    ],
)
def test_bad_input_messages(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.toml").write_text("[train\n")
    (tmp_path / "empty.txt").write_text("  ")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`make demo` in miniature: the same module with a handful of steps."""
    proc = ok(run("-m", "loom.demo", "--steps", "4", "--out", str(tmp_path / "demo"), cwd=tmp_path))
    assert "$ loom generate" in proc.stdout and "validation loss:" in proc.stdout
    assert (tmp_path / "demo" / "pretrain" / "checkpoints" / "step-4").is_dir()
    assert (tmp_path / "demo" / "report.html").is_file()
    assert (tmp_path / "demo" / "export" / "config.json").is_file()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--max-tokens", "-5"], "--max-tokens -5 must be at least 1"),
        (["--temperature", "nan"], "--temperature nan must be a finite number"),
        (["--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        (["--top-k", "-1"], "--top-k -1 must be ≥ 0"),
    ],
)
def test_generate_arguments_are_validated(
    flag: list[str], message: str, trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["generate", str(trained_run), "--prompt", "def ", *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    from loom.core.config import load_config
    from loom.train.trainer import train

    run = tmp_path_factory.mktemp("gen") / "run"
    overrides = [
        *TINY_MODEL,
        f"--data.path={data_dir}",
        f"--run_dir={run}",
        "--train.steps=2",
        "--train.seq_len=32",
        "--train.batch_size=2",
        "--metrics.progress=plain",
    ]
    train(load_config(None, overrides))
    return run


def test_torchrun_help_names_loom_torchrun(capsys: pytest.CaptureFixture[str]) -> None:
    """`loom torchrun` is torchrun's own parser, named after the command a user typed."""
    with pytest.raises(SystemExit) as exit_info:
        main(["torchrun", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: loom torchrun [-h] [--nnodes NNODES]")
    assert "--max-restarts" in out
