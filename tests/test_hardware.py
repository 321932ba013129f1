"""Peak rates: GPU names map to the right datasheet entry; the CPU rate is measured and cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from loom.planner.hardware import cpu_matmul_flops, gpu_spec, machine_key, peak_flops


@pytest.mark.parametrize(
    ("device_name", "spec", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", "H100-SXM", 989.4),
        ("NVIDIA H100 PCIe", "H100-PCIe", 756.0),
        ("NVIDIA H100 NVL", "H100-NVL", 835.0),
        ("NVIDIA H200", "H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
        ("NVIDIA B200", "B200", 2250.0),
    ],
)
def test_gpu_names_match_datasheets(device_name: str, spec: str, bf16: float) -> None:
    found = gpu_spec(device_name)
    assert found is not None and found.name == spec and found.tflops["bf16"] == bf16


def test_unknown_gpu_has_no_spec() -> None:
    assert gpu_spec("Tesla T4") is None


def test_cpu_peak_is_measured_once_then_read_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    rate = cpu_matmul_flops(torch.float32)
    assert 1e9 < rate < 1e14  # a plausible CPU, whatever this machine is
    cache = tmp_path / "cpu_peak.json"
    entries = json.loads(cache.read_text())
    assert len(entries) == 1 and f"threads={torch.get_num_threads()}" in next(iter(entries))
    cache.write_text(json.dumps({k: 123.0 for k in entries}))
    assert cpu_matmul_flops(torch.float32) == 123.0  # served from the cache, not re-measured
    value, source = peak_flops(torch.device("cpu"), "fp32")
    assert value == 123.0 and "measured CPU fp32" in source
    bf16 = cpu_matmul_flops(torch.bfloat16)  # another precision is another entry
    assert bf16 != 123.0 and len(json.loads(cache.read_text())) == 2


def test_mfu_is_never_reported_against_a_peak_below_a_real_step(
    tiny_config: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cached peak far below what training achieves (a noisy measurement) is measured again
    once a real step beats it: the logged MFU stays at most 1 and the cache is corrected."""
    from loom.planner.hardware import _cache_key
    from loom.train.trainer import train

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cache = tmp_path / "cache" / "cpu_peak.json"
    cache.write_text(json.dumps({_cache_key(torch.float32): 1e6}))  # 1 MFLOP/s: impossible
    cfg = tiny_config("--train.steps=4", "--metrics.log_interval=2")  # type: ignore[operator]
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    per_token = cfg.model.flops_per_token(cfg.train.seq_len)  # type: ignore[attr-defined]
    achieved = max(per_token * r["tokens_per_s"] for r in records)
    assert records and all(0 < r["mfu"] <= 1 for r in records)
    corrected = json.loads(cache.read_text())[_cache_key(torch.float32)]
    assert corrected != 1e6  # the impossible figure was replaced
    assert corrected >= per_token * records[0]["tokens_per_s"]  # not below what a step reached
    assert corrected >= 0.5 * achieved  # a later interval may run faster than the first


def saved_profile(**fields: Any) -> dict[str, Any]:
    """A hardware profile as calibration saves it for this machine, with `fields` changed."""
    base = {"key": machine_key(), "name": "this", "matmul_half_size": 4.0, "memory_gbps": 10.0}
    return {**base, "collective_gbps": None, "memory_gb": 16.0, "threads": 2, **fields}


def test_a_busy_calibration_never_lowers_the_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A calibration on a busy machine measures every rate low: the saved profile keeps the
    best of each, and a matmul peak cached since (raised by a real training step) lifts the
    profile's peak without changing the attention rate it implies."""
    from loom.planner.calibrate import PROFILE, best_of, this_machine
    from loom.planner.hardware import _cache_key

    quiet = saved_profile(
        peak_tflops={"fp32": 0.2, "bf16": 0.4}, attention_efficiency={"fp32": 0.3, "bf16": 0.1}
    )
    busy = {
        **quiet,
        "peak_tflops": {"fp32": 0.08, "bf16": 0.5},
        "matmul_half_size": 256.0,
        "attention_efficiency": {"fp32": 0.5, "bf16": 0.02},
        "memory_gbps": 5.0,
        "collective_gbps": 1.5,
    }
    merged = best_of(quiet, busy)
    assert merged["peak_tflops"] == {"fp32": 0.2, "bf16": 0.5}
    assert merged["matmul_half_size"] == 4.0 and merged["memory_gbps"] == 10.0
    assert merged["collective_gbps"] == 1.5
    # attention as rates: fp32 0.3 × 0.2 = 0.06 beats 0.5 × 0.08; bf16 0.1 × 0.4 = 0.04
    assert merged["attention_efficiency"] == {"fp32": 0.3, "bf16": 0.08}

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path))
    (tmp_path / PROFILE).write_text(json.dumps(quiet))
    (tmp_path / "cpu_peak.json").write_text(json.dumps({_cache_key(torch.float32): 0.4e12}))
    hw = this_machine(1)
    assert hw.peak_tflops == {"fp32": 0.4, "bf16": 0.4}  # fp32 raised by the cached peak
    assert hw.attention_efficiency["fp32"] == pytest.approx(0.15)  # the same 0.06 TFLOP/s


def test_a_tiny_measured_attention_rate_is_kept_not_rounded_to_zero() -> None:
    """A busy machine once measured bf16 attention at 0.0004 of the peak; rounded to 3
    decimals it was saved as 0, and every plan then divided by a zero rate."""
    from loom.planner.calibrate import best_of, significant

    assert significant(0.000412345) == 0.000412 and significant(0.15555) == 0.156
    slow = saved_profile(
        peak_tflops={"fp32": 0.2, "bf16": 1.7},
        attention_efficiency={"fp32": 0.2, "bf16": 0.0004},
    )
    merged = best_of(slow, {**slow, "attention_efficiency": {"fp32": 0.1, "bf16": 0.0003}})
    assert merged["attention_efficiency"]["bf16"] == pytest.approx(0.0004)
