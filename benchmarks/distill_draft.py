"""Make a draft model for `loom serve --speculate DRAFT` on SmolLM2-135M-Instruct with Loom.

The draft keeps a few of the 135M's 30 layers (its embedding, final norm and output are the
135M's; `--layers`, default the first two and the last) and learns the 135M's next-token
distributions with `loom finetune` (`finetune.method = "distill"`, KL to the teacher) on
the teacher's own greedy answers to chat requests built from the standard library's
sources and docstrings — seeded apart from the requests of benchmarks/speculative.py, so the
draft is measured on prompts it was not trained on.

    python benchmarks/distill_draft.py --out /tmp/draft     # ≈ 25 min on an idle 2-core CPU
    python benchmarks/speculative.py --draft /tmp/draft/run

Prints the acceptance of the pruned draft before and after distillation (greedy, on the
edit and question workloads of benchmarks/speculative.py).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from report import smollm2_gguf
from safetensors.torch import load_file, save_file
from serve_load import stdlib_material

CHANGES = ("every name in camelCase", "shorter names", "docstrings added", "no comments")


def prune(teacher_hf: Path, layers: list[int], out: Path) -> None:
    """An HF folder holding `layers` of the teacher (renumbered) and everything else of it."""
    out.mkdir(parents=True, exist_ok=True)
    for f in teacher_hf.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    config = json.loads((teacher_hf / "config.json").read_text())
    config["num_hidden_layers"] = len(layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    kept = {}
    for name, tensor in load_file(teacher_hf / "model.safetensors").items():
        parts = name.split(".")
        if name.startswith("model.layers."):
            if int(parts[2]) not in layers:
                continue
            parts[2] = str(layers.index(int(parts[2])))
        kept[".".join(parts)] = tensor
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})


def prompts(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Chat requests like benchmarks/speculative.py's (edits of code, short questions) and
    serve_load's explain/summarize ones, from another seed."""
    rng = random.Random(seed)
    code, docs = stdlib_material()
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            _, lines = rng.choice(code)
            start = rng.randrange(max(len(lines) - 40, 1))
            excerpt = "\n".join(lines[start : start + 25])[:900]
            text = f"Repeat this code with {rng.choice(CHANGES)}:\n\n{excerpt}"
        elif kind == 1:
            name, _ = rng.choice(docs)
            text = f"What does {name} do? Answer briefly."
        else:
            _, lines = rng.choice(code)
            start = rng.randrange(max(len(lines) - 30, 1))
            text = "Explain this code:\n\n" + "\n".join(lines[start : start + 15])[:600]
        out.append([{"role": "user", "content": text}])
    return out


def teacher_answers(gguf: Path, requests: list[list[dict[str, str]]], scratch: Path) -> list[str]:
    """The teacher's greedy answers (max 128 tokens), 32 requests at a time in one continuous
    batch (a batch whose sequences all fit in the default KV cache)."""
    from loom.serve.engine import SamplingParams, Sequence
    from loom.serve.server import ServeOptions, build_engine

    engine, served, _ = build_engine(gguf, ServeOptions(max_batch=32), scratch)
    answers = []
    for start in range(0, len(requests), 32):
        seqs = [
            Sequence(
                served.tokenizer.encode(
                    served.template.render(m, add_generation_prompt=True), add_special_tokens=False
                ).ids,
                SamplingParams(max_tokens=128, temperature=0.0),
                lambda e: None,
            )
            for m in requests[start : start + 32]
        ]
        engine.submit(seqs)
        while engine.has_work():
            engine.step()
        answers += [served.tokenizer.decode(s.output_ids, skip_special_tokens=True) for s in seqs]
        print(f"teacher answers: {len(answers)}/{len(requests)}", flush=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", default="0,1,29", help="teacher layers the draft keeps")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(2)
    from loom.models.convert import convert

    gguf = smollm2_gguf()
    teacher = args.out / "teacher"
    if not teacher.exists():
        convert(gguf, teacher, "hf")
    prune(teacher, [int(i) for i in args.layers.split(",")], args.out / "pruned")
    data = args.out / "answers.jsonl"
    if not data.exists():
        requests = prompts(args.examples, seed=1)
        answers = teacher_answers(gguf, requests, args.out / "scratch")
        with data.open("w") as f:
            for messages, answer in zip(requests, answers, strict=True):
                row = {"messages": [*messages, {"role": "assistant", "content": answer}]}
                f.write(json.dumps(row) + "\n")
    subprocess.run(
        [
            sys.executable, "-m", "loom", "finetune",
            str(Path(__file__).parent / "distill_draft.toml"),
            f"--model.path={args.out / 'pruned'}", f"--distill.teacher={teacher}",
            f"--data.path={data}", f"--train.steps={args.steps}", f"--run_dir={args.out / 'run'}",
        ],
        check=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
