"""memory.activation_offload: saved activations wait in the host store from forward to backward.

Runs the real parallelize path in one process on the CPU (host and device memory are one, so
the store's counters show what moves): losses and gradients equal to a run without offload
under every recomputation mode, the store holding each block's saved activations after the
forward and nothing after the backward, and LoRA fine-tuning and the Trainer running with it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_MODEL

from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.core.lora import LoRAConfig, apply_lora, init_lora_parameter_
from loom.core.loss import cross_entropy
from loom.models.llama import init_parameter_
from loom.parallel.activation_offload import MIN_BYTES
from loom.parallel.dims import resolve
from loom.parallel.parallelize import ParallelModel, parallelize

BATCH, SEQ = 4, 32
TOLERANCE = {"fp32": 1e-6, "bf16": 1e-3}


def build(
    offload: bool,
    recompute: str,
    precision: str = "fp32",
    lora: bool = False,
    compile: bool = False,
) -> Any:
    cfg = load_config(
        None,
        [
            *TINY_MODEL,
            f"--train.seq_len={SEQ}",
            f"--train.precision={precision}",
            f"--train.compile={str(compile).lower()}",
            f"--memory.recompute={recompute}",
            f"--memory.activation_offload={str(offload).lower()}",
        ],
    )
    if not lora:
        return cfg, parallelize(cfg, resolve(cfg, 1), None, torch.device("cpu"), cross_entropy)

    def init(name: str, tensor: torch.Tensor) -> None:
        if not init_lora_parameter_(name, tensor, 0):
            init_parameter_(cfg.model, name, tensor, 0)

    adapt = lambda part: apply_lora(part, LoRAConfig(rank=4))  # noqa: E731
    model = parallelize(cfg, resolve(cfg, 1), None, torch.device("cpu"), cross_entropy, adapt, init)
    return cfg, model


def batch(generator: torch.Generator, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train(offload: bool, recompute: str, precision: str, lora: bool = False) -> Any:
    """20 AdamW steps; the losses, each step's gradients, and the model."""
    cfg, model = build(offload, recompute, precision, lora)
    params = [p for p in model.parts[0].parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses, grads = [], []
    for _ in range(20):
        loss = model.forward_backward(*batch(generator, cfg), 1.0)
        if offload:  # every saved activation was brought back and let go
            assert model.activation_store.held_bytes == 0
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in params])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads, model


# One case in the quick tier; the rest (several seconds each on a loaded CPU) are slow.
PARITY = [
    pytest.param(r, p, marks=[] if (r, p) == ("none", "fp32") else [pytest.mark.slow])
    for r in ("none", "selective", "full")
    for p in ("fp32", "bf16")
]


@pytest.mark.parametrize("recompute,precision", PARITY)
def test_losses_and_gradients_equal_a_run_without_offload(recompute: str, precision: str) -> None:
    ref_losses, ref_grads, _ = train(False, recompute, precision)
    losses, grads, model = train(True, recompute, precision)
    assert model.activation_store.offloaded_bytes > 0
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= TOLERANCE[precision]
    for step, ref in zip(grads, ref_grads, strict=True):
        for g, r in zip(step, ref, strict=True):
            assert (g - r).abs().max().item() <= TOLERANCE[precision]


@pytest.mark.slow
def test_lora_finetuning_equals_a_run_without_offload() -> None:
    ref_losses, ref_grads, _ = train(False, "none", "fp32", lora=True)
    losses, grads, model = train(True, "none", "fp32", lora=True)
    assert model.activation_store.offloaded_bytes > 0
    assert max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)) <= 1e-6
    for step, ref in zip(grads, ref_grads, strict=True):
        assert all(torch.equal(g, r) for g, r in zip(step, ref, strict=True))


def saved_block_bytes(cfg: Config, model: ParallelModel) -> int:
    """Bytes the blocks' forwards save for backward without offload, as torch's own
    saved-tensor hooks see them: activations of MIN_BYTES or more, each storage view once."""
    part = model.parts[0]
    params = {p.untyped_storage().data_ptr() for p in part.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in part.buffers()}
    seen: dict[tuple[object, ...], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if nbytes >= MIN_BYTES and t.untyped_storage().data_ptr() not in params:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride())
            seen[key] = nbytes
        return t

    def enter(block: torch.nn.Module, args: Any) -> None:
        hooks.__enter__()

    def leave(block: torch.nn.Module, args: Any, output: Any) -> None:
        hooks.__exit__(None, None, None)

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    handles = [b.register_forward_pre_hook(enter) for b in part.layers.values()]
    handles += [b.register_forward_hook(leave) for b in part.layers.values()]
    generator = torch.Generator().manual_seed(0)
    assert model.forward_loss is not None
    model.forward_loss(*batch(generator, cfg), None).backward()
    for h in handles:
        h.remove()
    return sum(seen.values())


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_the_store_holds_the_blocks_activations_until_backward(recompute: str) -> None:
    cfg, model = build(True, recompute)
    store = model.activation_store
    generator = torch.Generator().manual_seed(0)
    assert model.forward_loss is not None
    loss = model.forward_loss(*batch(generator, cfg), None)
    held = store.held_bytes
    inputs = cfg.model.n_layers * BATCH * SEQ * cfg.model.dim * 4  # fp32 residual stream
    everything = saved_block_bytes(*build(False, "none"))  # as measured without offload
    if recompute == "none":
        assert held == everything > inputs
    elif recompute == "full":  # only each block's input
        assert held == inputs
    else:  # the inputs and the cached matmul / attention outputs
        assert inputs < held < everything
    assert store.peak_held_bytes == held == store.offloaded_bytes
    loss.backward()
    assert store.held_bytes == 0
    store.reset_counters()
    assert store.offloaded_bytes == store.peak_held_bytes == 0


def test_no_grad_forward_stores_nothing() -> None:
    cfg, model = build(True, "none")
    generator = torch.Generator().manual_seed(0)
    model.eval_loss(*batch(generator, cfg))
    assert model.activation_store.offloaded_bytes == 0


def test_the_trainer_runs_with_activation_offload(tiny_config: Any) -> None:
    from loom.train.trainer import Trainer

    trainer = Trainer(tiny_config("--memory.activation_offload=true", "--train.steps=4"))
    result = trainer.run()
    assert trainer.model.activation_store is not None
    assert trainer.model.activation_store.offloaded_bytes > 0
    assert trainer.model.activation_store.held_bytes == 0
    assert sorted(result.train_losses) == [1, 2, 3, 4]


def test_compile_is_refused_with_the_fix() -> None:
    with pytest.raises(LoomError, match="set train.compile=false"):
        build(True, "none", compile=True)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_simulate_counts_offloaded_activations_as_host_memory(recompute: str) -> None:
    """`loom train --simulate`: what the host store holds leaves the device's activations."""
    from loom.train.simulate import simulate

    args = [
        *TINY_MODEL,
        "--model.n_layers=4",
        "--train.seq_len=128",
        "--train.batch_size=16",
        "--train.micro_batch_size=16",
        f"--memory.recompute={recompute}",
    ]
    memory = {
        offload: simulate(
            load_config(None, [*args, f"--memory.activation_offload={offload}"]), 2
        ).memory_gib
        for offload in ("false", "true")
    }
    moved = memory["false"]["activations"] - memory["true"]["activations"]
    assert moved > 0
    assert memory["false"]["total"] - memory["true"]["total"] == pytest.approx(moved)
    if recompute == "full":  # the 4 blocks' inputs: 8 sequences per rank of 128 x 64 fp32
        assert moved * 2**30 == 4 * 8 * 128 * 64 * 4


@pytest.mark.gpu
def test_on_a_gpu_the_device_peak_drops_and_losses_stay() -> None:
    """8 blocks of dim 1024 over 4 x 512 tokens in fp32 (about 2 GiB of saved activations):
    with offload the device holds a block or two of them at a time, not all eight."""
    args = [
        "--model.vocab_size=512",
        "--model.dim=1024",
        "--model.n_layers=8",
        "--model.n_heads=8",
        "--model.n_kv_heads=8",
        "--model.ffn_hidden=2816",
        "--model.max_seq_len=512",
        "--train.seq_len=512",
    ]
    device = torch.device("cuda")
    peaks, losses, held = {}, {}, 0
    for offload in (False, True):
        cfg = load_config(None, [*args, f"--memory.activation_offload={str(offload).lower()}"])
        model = parallelize(cfg, resolve(cfg, 1), None, device, cross_entropy)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 512, (4, 513), generator=generator).to(device)
        model.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        losses[offload] = model.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0).item()
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated()
        if model.activation_store is not None:
            held = model.activation_store.peak_held_bytes
            assert model.activation_store.held_bytes == 0
        del model
        torch.cuda.empty_cache()
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)
    assert held > 1 << 29
    assert peaks[True] < peaks[False] - held / 2, (peaks, held)
