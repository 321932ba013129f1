"""Peak rates: GPU names map to the right datasheet entry; the CPU rate is measured and cached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loom.planner.hardware import cpu_matmul_flops, gpu_spec, peak_flops


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
