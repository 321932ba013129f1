"""Hardware health (loom.train.health): the matmul check on this CPU in fp32 and bf16, a bit
flipped by the `sdc` fault refusing the run with the rank and device named (before the first
step, and in a check during training, which also sets aside the checkpoints it cannot vouch
for), the all-reduce check under a real two-rank `loom train --nproc 2`, and NVML on a GPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_launch import args, error_line, finish, loom_train

from loom.core.errors import LoomError
from loom.train.health import (
    FAILED,
    NOT_CHECKED,
    OK,
    WARN,
    Needs,
    disk_check,
    matmul_check,
    memory_check,
    nvml_check,
    nvml_verdict,
    preflight,
)
from loom.train.metrics import read_metrics
from loom.train.resilience import parse_faults
from loom.train.trainer import Trainer

CPU = torch.device("cpu")
MakeConfig = Callable[..., object]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_check_passes_on_this_cpu(dtype: torch.dtype) -> None:
    result = matmul_check(CPU, dtype)
    assert result["status"] == OK, result
    assert result["max_error"] <= result["max_allowed"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_flipped_bit_fails_the_matmul_check(dtype: torch.dtype) -> None:
    result = matmul_check(CPU, dtype, corrupt=True)
    assert result["status"] == FAILED
    assert result["wrong_elements"] == 1, result
    assert "take it out of the job" in result["fix"]


def test_a_corrupted_result_refuses_naming_the_device_and_writes_health_json(
    tmp_path: Path,
) -> None:
    needs = Needs(memory_bytes=None, checkpoint_bytes=1.0, checkpoints=1)
    with pytest.raises(LoomError) as refused:
        preflight(CPU, torch.bfloat16, tmp_path / "run", needs, corrupt=True)
    message = str(refused.value)
    assert "rank 0 (host " in message and "device cpu" in message, message
    assert "matmul_float32" in message and "matmul_bfloat16" in message, message
    assert "resilience.preflight=false" in message
    report = json.loads((tmp_path / "run" / "health.json").read_text())
    assert report["ok"] is False
    assert report["ranks"][0]["checks"]["memory"]["status"] == NOT_CHECKED


def test_a_run_on_one_process_checks_first_and_refuses_under_the_sdc_fault(
    tiny_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    Trainer(tiny_config("--train.steps=1"))
    report = json.loads((tmp_path / "run" / "health.json").read_text())
    checks = report["ranks"][0]["checks"]
    assert report["ok"] and report["world_size"] == 1
    assert {checks[k]["status"] for k in ("matmul_float32", "memory", "disk")} == {OK}
    assert checks["nvml"] == {"status": NOT_CHECKED, "reason": "not a CUDA device"}
    assert "all_reduce" not in checks

    monkeypatch.setenv("LOOM_FAULTS", "sdc@0")
    with pytest.raises(LoomError, match=r"pre-flight health check failed on 1 rank: rank 0"):
        Trainer(tiny_config("--train.steps=1", run_dir=tmp_path / "bad"))
    Trainer(
        tiny_config("--train.steps=1", "--resilience.preflight=false", run_dir=tmp_path / "off")
    )
    assert not (tmp_path / "off" / "health.json").exists()


def test_sdc_fault_specs() -> None:
    (fault,) = parse_faults("sdc@0:rank=1")
    assert (fault.kind, fault.first, fault.last, fault.rank) == ("sdc", 0, 0, 1)
    (later,) = parse_faults("sdc@6")
    assert (later.first, later.last, later.rank) == (6, 6, None)


def test_a_check_failing_in_training_sets_aside_the_checkpoints_since_the_last_pass(
    tiny_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Checks after steps 3 and 6, checkpoints at 2 and 4; `sdc@6` fails the second check: the
    run stops before step 6's checkpoint, step-4 (written after the passing check of step 3)
    goes to checkpoints/suspect/, and the same command resumes from step-2, ending with the
    losses of a run that never failed."""
    overrides = ("--train.steps=8", "--checkpoint.interval=2", "--resilience.health_interval=3")
    clean = Trainer(tiny_config(*overrides, run_dir=tmp_path / "clean")).run()
    run = tmp_path / "run"
    monkeypatch.setenv("LOOM_FAULTS", "sdc@6")
    with pytest.raises(LoomError) as stopped:
        Trainer(tiny_config(*overrides)).run()
    message = str(stopped.value)
    assert "health check after step 6 failed on 1 rank: rank 0 (host " in message, message
    assert "device cpu" in message and "matmul_float32" in message, message
    assert "after step 3 (the last check that passed), step-4, are in" in message, message
    assert message.endswith("resumes from step-2"), message
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-2"]
    assert [p.name for p in (checkpoints / "suspect").iterdir()] == ["step-4"]
    assert (checkpoints / "latest").resolve() == checkpoints / "step-2"
    report = json.loads((run / "health.json").read_text())
    assert report["ok"] is True  # the pre-flight check, kept
    assert report["in_training"]["step"] == 6 and report["in_training"]["ok"] is False
    (rank,) = report["in_training"]["ranks"]
    assert rank["checks"]["matmul_float32"]["status"] == FAILED
    assert set(rank["checks"]) == {"matmul_float32", "nvml"}

    monkeypatch.delenv("LOOM_FAULTS")
    resumed = Trainer(tiny_config(*overrides))
    assert resumed.step == 2
    result = resumed.run()
    assert result.train_losses == {s: clean.train_losses[s] for s in range(3, 9)}
    after = json.loads((run / "health.json").read_text())["in_training"]
    assert after["step"] == 6 and after["ok"] is True


def test_too_little_memory_or_disk_is_a_warning(tmp_path: Path) -> None:
    disk = disk_check(tmp_path / "not-yet" / "run", needed_bytes=1e18)
    assert disk["status"] == WARN and str(tmp_path) in disk["problem"], disk
    assert disk_check(tmp_path, needed_bytes=1.0)["status"] == OK
    memory = memory_check(CPU, needed_bytes=1e18)
    assert memory["status"] == WARN and "the planner predicts" in memory["problem"], memory


def test_nvml_readings_are_judged_and_missing_ones_not_checked() -> None:
    healthy = {
        "ecc_uncorrected_volatile": 0,
        "row_remap_pending": 0,
        "row_remap_failed": 0,
        "temperature_c": 41,
        "slowdown_temperature_c": 87,
        "clock_event_reasons": 0x01 | 0x04,  # idle and software power cap: normal
    }
    assert nvml_verdict(healthy) == {"status": OK, **healthy}
    sick = nvml_verdict(
        healthy | {"ecc_uncorrected_volatile": 2, "temperature_c": 90, "clock_event_reasons": 0x40}
    )
    assert sick["status"] == FAILED
    assert "2 uncorrectable ECC" in sick["problem"] and "90 °C" in sick["problem"]
    assert "hardware thermal slowdown" in sick["problem"] and "nvidia-smi -r" in sick["fix"]
    partial = nvml_verdict(healthy | {"ecc_uncorrected_volatile": None})
    assert partial["status"] == OK and partial["not_checked"] == ["ecc_uncorrected_volatile"]


@pytest.mark.slow
def test_two_ranks_check_the_all_reduce_and_refuse_a_corrupting_rank(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three real `loom train --nproc 2` launches, started together: a healthy one whose
    health.json holds both ranks' exact all-reduce with a bandwidth; one with `sdc@0:rank=1`
    that refuses to start, naming rank 1 only; and one whose rank 1 fails the check after
    step 6 (`sdc@6:rank=1`): both ranks stop, step-4 goes to suspect/, and the launcher's
    restart resumes from step-2 and finishes."""
    monkeypatch.delenv("LOOM_FAULTS", raising=False)
    healthy = loom_train("--nproc", "2", *args(data_dir, tmp_path / "ok", "--train.steps=1"))
    monkeypatch.setenv("LOOM_FAULTS", "sdc@0:rank=1")
    faulty = loom_train("--nproc", "2", *args(data_dir, tmp_path / "bad", "--train.steps=1"))
    monkeypatch.setenv("LOOM_FAULTS", "sdc@6:rank=1")
    checks = ("--train.steps=8", "--checkpoint.interval=2", "--resilience.health_interval=3")
    later = loom_train(
        "--nproc", "2", "--max-restarts", "1", *args(data_dir, tmp_path / "later", *checks)
    )
    (code, err), (bad_code, bad_err) = finish(healthy), finish(faulty)
    later_code, later_err = finish(later)
    assert code == 0, err[-4000:]
    report = json.loads((tmp_path / "ok" / "health.json").read_text())
    assert report["ok"] and [r["rank"] for r in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        reduce = rank["checks"]["all_reduce"]
        assert reduce["status"] == OK and reduce["backend"] == "gloo", reduce
        assert reduce["bus_gb_s"] > 0 and reduce["bytes"] == 16 * 2**20
    assert "pre-flight health: 2 rank(s) checked" in err

    assert bad_code != 0
    line = error_line(bad_err)
    assert "pre-flight health check failed on 1 rank: rank 1 (host " in line, line
    assert "rank 0 (" not in line
    bad = json.loads((tmp_path / "bad" / "health.json").read_text())
    assert [r["checks"]["matmul_float32"]["status"] for r in bad["ranks"]] == [OK, FAILED]
    assert not (tmp_path / "bad" / "checkpoints").exists()  # no step was spent

    assert later_code == 0, later_err[-4000:]
    assert "health check after step 6 failed on 1 rank: rank 1 (host " in later_err, later_err
    assert "step-4, are in" in later_err
    checkpoints = tmp_path / "later" / "checkpoints"
    assert [p.name for p in (checkpoints / "suspect").iterdir()] == ["step-4"]
    assert "resumed from " + str(checkpoints / "step-2") in later_err
    assert [r["step"] for r in read_metrics(tmp_path / "later")] == list(range(1, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_check_on_the_gpu(dtype: torch.dtype) -> None:
    gpu = torch.device("cuda", torch.cuda.current_device())
    assert matmul_check(gpu, dtype)["status"] == OK
    assert matmul_check(gpu, dtype, corrupt=True)["status"] == FAILED


@pytest.mark.gpu
def test_nvml_reads_this_gpu() -> None:
    """A healthy lent GPU passes; without pynvml the check says why it did not run."""
    result = nvml_check(torch.device("cuda", torch.cuda.current_device()))
    if result["status"] == NOT_CHECKED:
        assert "pynvml" in result["reason"] or "NVML" in result["reason"], result
    else:
        assert result["status"] == OK, result
        assert result["temperature_c"] is not None, result
