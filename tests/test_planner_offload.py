"""The planner's offload tiers (issue 19): bytes on device, host and disk per tier counted by
hand, their step-time costs, host-capacity refusal, and the seed questions answered with
layouts `loom train` / `loom finetune` accept."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from loom.core.config import load_config
from loom.finetune.config import load_finetune_config
from loom.planner.cost import step_time
from loom.planner.largest import family_shape, largest
from loom.planner.layout import config_overrides
from loom.planner.memory import GB, estimate, fits, refusal
from loom.planner.search import plan
from loom.planner.spec import Hardware, ModelShape, Strategy, parse_spec

# A small Llama: 4 blocks of width 256 (q, k, v, o; a 512-wide SwiGLU MLP; two norms), a
# 1,000-token vocabulary, untied embedding and head, the final norm.
L, H, F, V, S = 4, 256, 512, 1000, 128
PARAMS = L * (4 * H * H + 3 * H * F + 2 * H) + 2 * V * H + H
SMALL = ModelShape(layers=L, hidden=H, heads=4, kv_heads=4, ffn_hidden=F, vocab=V, seq_len=S)
ONE = Hardware(
    "test",
    {"bf16": 100.0},
    memory_gb=80,
    devices=1,
    devices_per_node=1,
    host_memory_gb=100,
    host_link_gbps=10,
    disk_gb=1000,
    disk_gbps=2,
    cpu_adam_params_per_s=1e8,
)
BASE = Strategy(recompute="full", global_batch=1)


def test_the_small_model_is_counted_right() -> None:
    assert SMALL.params() == PARAMS


def test_each_tier_moves_the_bytes_it_names() -> None:
    none = estimate(SMALL, ONE, BASE)
    assert (none.params, none.optimizer, none.host, none.disk) == (PARAMS * 4, PARAMS * 8, 0, 0)
    # Optimizer: Adam's moments and an fp32 master (12 B) to host; fp32 weights stay.
    opt = estimate(SMALL, ONE, replace(BASE, offload="optimizer"))
    assert (opt.params, opt.optimizer, opt.host, opt.disk) == (PARAMS * 4, 0, PARAMS * 12, 0)
    # NVMe: the 12 B in files, a window of 2 of the 4 blocks' share in host memory.
    nvme = estimate(SMALL, ONE, replace(BASE, offload="optimizer", offload_nvme=True))
    assert nvme.disk == PARAMS * 12 and nvme.host == pytest.approx(PARAMS * 12 * 2 / L)
    # Params (FSDP's CPU offload): weights, gradients and Adam, 16 B, all on the host.
    params = estimate(SMALL, ONE, replace(BASE, offload="params", zero_stage=3))
    assert params.params == params.optimizer == 0 and params.host == PARAMS * 16
    # Activations under full recomputation: each block keeps its fp32 input, 4 · s · h bytes;
    # all but two blocks' wait in host memory.
    acts = estimate(SMALL, ONE, replace(BASE, activation_offload=True))
    moved = (L - 2) * 4 * S * H
    assert acts.host == moved and none.activations - acts.activations == moved


def test_tier_costs_traffic_cpu_step_and_disk() -> None:
    none = step_time(SMALL, ONE, BASE)
    assert none.offload == 0
    opt = step_time(SMALL, ONE, replace(BASE, offload="optimizer"))
    link = PARAMS * (4 + 4) / 10e9  # fp32 gradients down, fp32 weights up
    assert opt.offload == pytest.approx(link + PARAMS / 1e8) and opt.optimizer == 0
    # NVMe: master and moments read and written back, overlapped with the CPU step.
    nvme = step_time(SMALL, ONE, replace(BASE, offload="optimizer", offload_nvme=True))
    disk = 2 * PARAMS * 12 / 2e9
    assert nvme.offload == pytest.approx(link + max(PARAMS / 1e8, disk))
    # Activation copies overlap the blocks' compute: never more than the copies themselves.
    acts = step_time(SMALL, ONE, replace(BASE, activation_offload=True))
    copies = 2 * L * 4 * S * H / 10e9
    assert 0 <= acts.offload <= copies


def test_on_a_cpu_the_device_is_host_memory() -> None:
    """Loom's fp32 CPU parameters are their own master weights (8 B of moments per parameter to
    host or files, not 12), nothing crosses a host link, and the runtime allowance is the CPU
    process's, not a CUDA context's."""
    cpu = replace(ONE, host_device=True, runtime_gb=0.25)
    opt = replace(BASE, offload="optimizer")
    assert estimate(SMALL, cpu, opt).host == PARAMS * 8
    nvme = estimate(SMALL, cpu, replace(opt, offload_nvme=True))
    assert nvme.disk == PARAMS * 8 and nvme.host == pytest.approx(PARAMS * 8 * 2 / L)
    assert estimate(SMALL, ONE, opt).other - estimate(SMALL, cpu, opt).other == pytest.approx(
        0.75 * GB
    )
    assert step_time(SMALL, cpu, opt).offload == pytest.approx(PARAMS / 1e8)  # the CPU step only
    disk = 2 * PARAMS * 8 / 2e9
    assert step_time(SMALL, cpu, replace(opt, offload_nvme=True)).offload == pytest.approx(
        max(PARAMS / 1e8, disk)
    )


def test_a_layout_that_overfills_host_memory_is_refused() -> None:
    small_host = replace(ONE, host_memory_gb=PARAMS * 16 / GB / 2)
    memory = estimate(SMALL, small_host, replace(BASE, offload="params", zero_stage=3))
    assert not fits(memory, small_host)
    assert "hardware.host_mem_gb" in (refusal(memory, small_host) or "")
    # A job on one of eight devices gets an eighth of the node's host memory.
    node = replace(ONE, devices_per_node=8, host_memory_gb=PARAMS * 16 / GB * 4)
    assert not fits(estimate(SMALL, node, replace(BASE, offload="params", zero_stage=3)), node)
    no_disk = replace(ONE, disk_gb=PARAMS * 6 / GB)
    memory = estimate(SMALL, no_disk, replace(BASE, offload="optimizer", offload_nvme=True))
    assert "hardware.disk_gb" in (refusal(memory, no_disk) or "")


def model_overrides(model: ModelShape) -> list[str]:
    keys = {
        "model.vocab_size": model.vocab,
        "model.dim": model.hidden,
        "model.n_layers": model.layers,
        "model.n_heads": model.heads,
        "model.n_kv_heads": model.kv_heads,
        "model.head_dim": model.head_dim,
        "model.ffn_hidden": model.ffn_hidden,
        "model.max_seq_len": model.seq_len,
    }
    return [f"--{k}={v}" for k, v in keys.items()]


def test_largest_on_one_40gb_card_is_a_config_loom_train_accepts(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "model": {"preset": "llama3-8b", "seq_len": 4096},
            "hardware": {"gpu": "a100-40gb", "n_gpus": 1},
        }
    )
    found, best, _ = largest(spec)
    assert best.fits and best.memory.total <= 40e9
    wider = replace(spec, model=family_shape(found.model.hidden + 256, 4096))
    with pytest.raises(Exception, match="fits"):
        plan(wider)
    overrides = config_overrides(found.model, best.strategy, best.memory, str(tmp_path / "nvme"))
    cfg = load_config(
        None, model_overrides(found.model) + [f"--{k}={v}" for k, v in overrides.items()]
    )
    assert cfg.memory.offload == best.strategy.offload
    assert cfg.memory.activation_offload == best.strategy.activation_offload
    assert cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp_shard == 1


def test_70b_fine_tuning_on_24gb_cards_is_a_config_loom_finetune_accepts(tmp_path: Path) -> None:
    raw = {
        "model": {"preset": "llama3-70b", "seq_len": 1024},
        "hardware": {"gpu": "rtx4090", "n_gpus": 4},
        "search": {"finetune": "lora", "global_batch": 8},
    }
    best, _ = plan(parse_spec(raw))
    s = best.strategy
    assert best.fits and s.offload != "none" and s.finetune == "lora"
    model_dir, data = tmp_path / "base", tmp_path / "data.jsonl"
    model_dir.mkdir()
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    overrides = config_overrides(parse_spec(raw).model, s, best.memory, str(tmp_path / "nvme"))
    cfg = load_finetune_config(
        None,
        [f"--model.path={model_dir}", f"--data.path={data}"]
        + [f"--{k}={v}" for k, v in overrides.items()],
    )
    assert cfg.finetune.method == "lora" and cfg.memory.offload == s.offload
    assert cfg.parallel.dp_shard * cfg.parallel.dp_replicate == 4
