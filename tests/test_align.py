"""GRPO (`finetune.method = "grpo"`): the loss and gradients of a fixed batch of completions
equal TRL's GRPOTrainer; rollouts come from the serving engine over the policy's own weights;
a run records its rewards, resumes exactly and refuses bad input before it starts.

A tiny random Llama (saved by transformers) with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import SMOLLM2_VOCAB, save_tiny_llama

from loom.align.grpo import group_advantages
from loom.align.ppo import gae, kl_estimate, ppo_loss, token_rewards, whiten
from loom.align.trainer import OnlineFinetuning, align
from loom.core.errors import LoomError
from loom.finetune.config import FinetuneConfig, load_finetune_config
from loom.models.convert import write_hf
from loom.models.llama import build_model
from loom.models.sources import load_model
from loom.parallel.recompute import clean_name
from loom.report import write_report
from loom.train.trainer import Trainer

REWARDS = '''
def digits(prompt, completion, **row):
    """The share of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def answer_length(prompt, completion, answer, **row):
    """Closeness of the completion's length to the row's answer's."""
    return -abs(len(completion) - len(answer)) / 10
'''


@pytest.fixture(scope="module")
def base(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-hf")
    save_tiny_llama(folder, smollm2_tokenizer, 256, SMOLLM2_VOCAB, intermediate=128)
    return folder


@pytest.fixture
def prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Arithmetic questions with their answers; the reward functions importable as `rewards`."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rewards", None)
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as fh:
        for a in range(12):
            record = {"prompt": f"What is {a} + {a + 3}?", "answer": str(2 * a + 3)}
            fh.write(json.dumps(record) + "\n")
    return path


def grpo_flags(base: Path, prompts: Path, run_dir: Path, *overrides: str) -> list[str]:
    """A small GRPO run's settings, as command-line overrides."""
    return [
        f"--model.path={base}",
        f"--data.path={prompts}",
        f"--data.val_path={prompts}",
        f"--run_dir={run_dir}",
        "--finetune.method=grpo",
        "--grpo.rewards=rewards:digits,rewards:answer_length",
        "--grpo.reward_weights=1.0,0.5",
        "--grpo.group_size=4",
        "--grpo.max_new_tokens=12",
        "--train.steps=4",
        "--train.batch_size=2",
        "--train.seq_len=64",
        "--train.eval_interval=2",
        "--optimizer.lr=1e-3",
        "--optimizer.warmup_steps=0",
        "--optimizer.decay_steps=4",
        "--checkpoint.interval=2",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        *overrides,
    ]


def launch(
    prompts: Path, launcher: list[str], flags: list[str], **env: str
) -> subprocess.CompletedProcess[str]:
    """`loom finetune` under torchrun with `launcher`'s options (its workers import the
    reward functions beside `prompts`), asserted to succeed."""
    path = os.pathsep.join([str(prompts.parent), os.environ.get("PYTHONPATH", "")])
    toml = prompts.parent / "launch.toml"
    toml.write_text("[train]\nseed = 0\n")
    command = [sys.executable, "-m", "loom", "finetune", str(toml), *launcher, *flags]
    env = {**os.environ, "PYTHONPATH": path, **env}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def grpo_config(base: Path, prompts: Path, run_dir: Path, *overrides: str) -> FinetuneConfig:
    return load_finetune_config(None, grpo_flags(base, prompts, run_dir, *overrides))


def test_grpo_loss_and_gradients_equal_trl(base: Path, prompts: Path, tmp_path: Path) -> None:
    """Completions sampled by Loom's engine, their rewards and group advantages, a reference
    (the base) and sampling log-probabilities far enough from the policy's to clip: Loom's
    loss and gradients equal TRL's GRPOTrainer._compute_loss on transformers' model holding
    the same weights, for each loss variant (dapo, grpo, dr_grpo)."""
    import trl
    from datasets import Dataset

    ft = grpo_config(
        base,
        prompts,
        tmp_path / "run",
        "--grpo.lora=false",
        "--grpo.beta=0.1",
        "--grpo.temperature=0.7",
    )
    online = OnlineFinetuning(ft)
    trainer = Trainer(online.config, online.task())
    policy = trainer.model.parts[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy drifts from the reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    prompt = online.prompts[0]
    completions = online.sample([prompt], [11, 12, 13, 14])
    assert len({tuple(c.ids) for c in completions}) == 4  # four different samples
    per_source, rewards = online.score([prompt], completions)
    assert per_source.shape == (4, 2)
    assert torch.allclose(rewards, per_source @ torch.tensor([1.0, 0.5]))
    advantages = group_advantages(rewards, 4, "group")
    assert torch.allclose(advantages, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    # top_p near 0 keeps only the most likely token: sampling becomes greedy decoding
    greedy = online.sample([prompt], [0], greedy=True)[0].ids
    online.grpo.top_p = 1e-9
    assert [c.ids for c in online.sample([prompt], [5, 6])] == [greedy, greedy]
    online.grpo.top_p = 1.0
    ids = [c.ids for c in completions]
    longest = max(map(len, ids))
    old = torch.randn(4, longest, generator=generator) * 0.3  # sampled by a policy further off

    plain = build_model(policy.cfg, "cpu")
    plain.load_state_dict({clean_name(k): v for k, v in policy.state_dict().items()})
    (tmp_path / "hf").mkdir()
    write_hf(plain, base, tmp_path / "hf", "fp32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        use_cpu=True,
        bf16=False,
        num_generations=4,
        per_device_train_batch_size=4,
        beta=0.1,
        epsilon=0.2,
        temperature=0.7,
        max_completion_length=12,
        scale_rewards="group",
    )
    peer = trl.GRPOTrainer(
        hf,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "x"}]),
        processing_class=tokenizer,
    )
    completion_ids = torch.zeros(4, longest, dtype=torch.long)
    mask = torch.zeros(4, longest, dtype=torch.long)
    for i, c in enumerate(ids):
        completion_ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
    prompt_ids = torch.tensor([prompt.ids] * 4)
    sequences = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([torch.ones_like(prompt_ids), mask], 1)
    with torch.no_grad():  # the reference's by hand, the policy's by TRL's own code
        logits = reference(sequences).logits[:, -longest - 1 : -1] / 0.7
        ref_logps = logits.log_softmax(-1).gather(-1, completion_ids[..., None])[..., 0]
        old_logps = peer._get_per_token_logps_and_entropies(hf, sequences, attention, longest)[0]
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps + old,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": mask.sum(),
    }
    with torch.no_grad():
        current = online.policy_loss(trainer, [prompt.ids] * 4, ids, advantages)
    assert current.clip_fraction == 0  # sampled by this policy: the ratio is 1
    for loss in ("dapo", "grpo", "dr_grpo"):
        online.grpo.loss = peer.loss_type = loss
        for model in (policy, hf):
            model.zero_grad()
        out = online.policy_loss(trainer, [prompt.ids] * 4, ids, advantages, old_logps + old)
        out.loss.backward()
        assert out.clip_fraction > 0 and out.kl > 0
        expected = peer._compute_loss(hf, inputs)
        expected.backward()
        assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5), loss
        grads = {clean_name(n): p.grad for n, p in policy.named_parameters()}
        for name in (
            "layers.0.self_attn.q_proj.weight",
            "layers.1.mlp.down_proj.weight",
            "lm_head.weight",
        ):
            hf_name = name if name.startswith("lm_head") else f"model.{name}"
            hf_grad = hf.get_parameter(hf_name).grad
            assert torch.allclose(grads[name], hf_grad, atol=1e-5), (loss, name)


def records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_grpo_run_records_its_rewards_and_resumes_exactly(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """LoRA GRPO through the trainer: rewards per function, KL, clip fraction, completion
    length and rollout speed in metrics.jsonl, the held-out reward before and after, the adapter
    in PEFT's layout; stopped after 2 of 4 steps and resumed, it samples and updates exactly as
    the uninterrupted run (the samplers' seeds follow the step)."""
    kl = "--grpo.beta=0.05"
    whole = tmp_path / "whole"
    align(grpo_config(base, prompts, whole, kl))
    done = records(whole)
    assert done[0]["step"] == 0 and "val_reward" in done[0] and "loss" not in done[0]
    steps = [r for r in done if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"reward", "reward_std", "reward_digits", "reward_answer_length", "kl"} <= set(r)
        assert {"reward_digits_std", "reward_answer_length_std"} <= set(r)
        assert r["reward"] == pytest.approx(r["reward_digits"] + 0.5 * r["reward_answer_length"])
        assert 1 <= r["completion_tokens"] <= 12 and "rollout_tokens_per_s" in r
        assert 0 <= r["clip_fraction"] <= 1 and r["kl"] >= 0
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: π = π_ref
    assert steps[-1]["kl"] > 0
    assert {"val_reward", "val_reward_stderr"} <= set(done[-1])
    assert (whole / "adapter" / "adapter_model.safetensors").is_file()
    html = write_report(whole).read_text()
    held_out = [r["val_reward"] for r in done if "val_reward" in r]
    assert f"GRPO reward vs step, last {steps[-1]['reward']:.4f} at step 4" in html
    assert f"held-out reward {held_out[0]:.4f} at step 0, {held_out[-1]:.4f} at 4" in html

    resumed = tmp_path / "resumed"
    align(grpo_config(base, prompts, resumed, kl, "--train.steps=2"))
    align(grpo_config(base, prompts, resumed, kl))
    again = {r["step"]: r for r in records(resumed) if "loss" in r}
    for r in steps:
        for key in ("loss", "reward", "kl", "completion_tokens"):
            assert again[r["step"]][key] == pytest.approx(r[key], abs=1e-6), (r["step"], key)


def test_bad_grpo_input_is_refused_before_training(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    one = "--grpo.reward_weights="
    cases = {
        ("--grpo.group_size=1",): "grpo.group_size=1",
        ("--grpo.rewards=rewards", one): 'must read "module:function"',
        ("--grpo.rewards=nowhere:f", one): "module 'nowhere' cannot be imported",
        ("--grpo.rewards=rewards:absent", one): "has no function 'absent'",
        ("--grpo.reward_weights=1.0",): "1 weights for 2 rewards",
        ("--grpo.max_new_tokens=64",): "no room for a prompt",
        ("--grpo.temperature=0",): "temperature > 0",
        ("--grpo.rewards=", one): "needs rewards",
        ("--finetune.method=ppo", "--ppo.lam=2"): r"ppo.lam=2.0 must be in \[0, 1\]",
        ("--finetune.method=ppo", "--grpo.group_size=0"): "PPO samples at least 1",
    }
    for overrides, message in cases.items():
        with pytest.raises(LoomError, match=message):
            align(grpo_config(base, prompts, run, *overrides))
    assert not run.exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no prompt"}\n[1, 2]\n')
    with pytest.raises(LoomError, match="no usable prompt"):
        align(grpo_config(base, bad, run, f"--data.val_path={bad}"))


@pytest.mark.slow
def test_an_align_stage_follows_finetune_in_a_pipeline(
    base: Path, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`[align]` starts from `[finetune]`'s model, trains GRPO unless told otherwise, is
    planned in a dry run, and runs after `[finetune]` in `loom run`; an offline method there is
    refused with the fix."""
    from loom.cli import main

    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "What is 1 + 2?", "completion": "3"}) + "\n")
    text = f"""
[finetune]
model.path = "{base}"
data.path = "{sft}"
data.val_fraction = 0.0
train.steps = 2
train.seq_len = 64

[align]
data.path = "{prompts}"
grpo.rewards = ["rewards:digits"]
grpo.max_new_tokens = 8
train.steps = 2
train.seq_len = 64
train.batch_size = 2
"""
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    assert main(["run", str(path), f"--run_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "align:" in out and "  align      run" in out
    assert not (tmp_path / "run").exists()
    path.write_text(text.replace("train.batch_size = 2", 'finetune.method = "dpo"'))
    assert main(["run", str(path), f"--run_dir={tmp_path / 'run'}", "--dry-run"]) == 2
    assert "[align] finetune.method='dpo'" in capsys.readouterr().err

    path.write_text(text)
    assert main(["run", str(path), f"--run_dir={tmp_path / 'run'}"]) == 0
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [(stage["name"], stage["status"]) for stage in state["stages"]] == [
        ("finetune", "done"),
        ("align", "done"),
    ]
    config = (tmp_path / "run" / "align" / "config.toml").read_text()
    assert f'path = "{tmp_path / "run" / "finetune"}"' in config  # from [finetune]'s model
    steps = [r for r in records(tmp_path / "run" / "align") if "loss" in r]
    assert steps[-1]["step"] == 2 and "reward_digits" in steps[-1]


@pytest.mark.slow
def test_a_reward_model_scores_the_rendered_conversation(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """grpo.reward_model: an HF reward model (transformers' LlamaForSequenceClassification)
    scores prompt + completion rendered with its chat template, as transformers scores the
    same text; its column is weighted with the functions'."""
    config = transformers.AutoConfig.from_pretrained(base, num_labels=1)
    config.pad_token_id = 0
    torch.manual_seed(1)
    scorer = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    (tmp_path / "rm").mkdir()
    scorer.save_pretrained(tmp_path / "rm")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).is_file():
            (tmp_path / "rm" / name).write_bytes((base / name).read_bytes())
    ft = grpo_config(
        base,
        prompts,
        tmp_path / "run",
        f"--grpo.reward_model={tmp_path / 'rm'}",
        "--grpo.reward_weights=1.0,0.5,2.0",
    )
    online = OnlineFinetuning(ft)
    Trainer(online.config, online.task())
    prompt = online.prompts[3]
    completions = online.sample([prompt], [1, 2])
    per_source, rewards = online.score([prompt], completions)
    assert online.rewards.names == ["digits", "answer_length", "reward_model"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    for i, c in enumerate(completions):
        text = tokenizer.decode(c.ids[:-1] if c.stopped else c.ids, skip_special_tokens=True)
        messages = [
            {"role": "user", "content": prompt.record["prompt"]},
            {"role": "assistant", "content": text},
        ]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            expected = scorer(ids).logits[0, 0].item()
        assert per_source[i, 2].item() == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(rewards, per_source @ torch.tensor([1.0, 0.5, 2.0]))


def test_group_advantages_scale_by_group_batch_or_not_at_all() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 16.0])  # two prompts, 3 samples each
    centred = torch.tensor([-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])
    assert torch.allclose(group_advantages(rewards, 3, "none"), centred)
    per_group = torch.tensor([1.0, 1.0, 1.0, 12**0.5, 12**0.5, 12**0.5])
    assert torch.allclose(group_advantages(rewards, 3, "group"), centred / (per_group + 1e-4))
    whole = rewards.std()
    assert torch.allclose(group_advantages(rewards, 3, "batch"), centred / (whole + 1e-4))


def test_ppo_rewards_advantages_and_losses_equal_hand_computed_values() -> None:
    """Per-token rewards, GAE and the clipped policy and value losses on two completions (3
    tokens and 2), against the arithmetic written out by hand."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.3, -1.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), logps, ref, mask, 0.1)
    # −0.1·(logp − ref) per token, the score added on the last one
    assert torch.allclose(rewards, torch.tensor([[-0.02, 0.05, 2.0], [0.0, -0.98, 0.0]]))
    assert kl_estimate(logps, ref, mask) == pytest.approx((0.2 - 0.5 + 0 + 0 - 0.2) / 5)
    assert kl_estimate(logps, None, mask) == 0.0
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 9.9]])  # 9.9: past the end, unused
    advantages, returns = gae(rewards, values, mask.float(), gamma=0.9, lam=0.8)
    a02 = 2.0 - 0.3
    a01 = (0.05 + 0.9 * 0.3 - 0.4) + 0.72 * a02
    a00 = (-0.02 + 0.9 * 0.4 - 0.5) + 0.72 * a01
    a11 = -0.98 - 0.2
    a10 = (0.0 + 0.9 * 0.2 - 0.1) + 0.72 * a11
    expected = torch.tensor([[a00, a01, a02], [a10, a11, 0.0]])
    assert torch.allclose(advantages, expected, atol=1e-6)
    assert torch.allclose(returns, (expected + values) * mask, atol=1e-6)
    white = whiten(advantages, mask)
    real = [a00, a01, a02, a10, a11]
    mean = sum(real) / 5
    std = (sum((a - mean) ** 2 for a in real) / 4) ** 0.5
    assert white[0, 0].item() == pytest.approx((a00 - mean) / std, abs=1e-5)
    assert white[1, 2].item() == 0.0

    new_logps = logps + torch.tensor([[0.5, -0.05, 0.0], [-0.4, 0.1, 0.0]])
    new_values = values + torch.tensor([[0.3, -0.1, 0.0], [0.05, -0.5, 0.0]])
    out = ppo_loss(new_logps, logps, new_values, values, white, returns, mask, 0.2, 0.2, 0.1)
    policy_terms, value_terms, clipped = [], [], 0
    for i, j in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1)):
        ratio = math.exp(new_logps[i, j] - logps[i, j])
        a, r = white[i, j].item(), returns[i, j].item()
        policy_terms.append(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)))
        clipped += abs(ratio - 1) > 0.2
        v, v_old = new_values[i, j].item(), values[i, j].item()
        v_clipped = v_old + min(max(v - v_old, -0.2), 0.2)
        value_terms.append(0.5 * max((v - r) ** 2, (v_clipped - r) ** 2))
    policy, value = sum(policy_terms) / 5, sum(value_terms) / 5
    assert out.policy_loss == pytest.approx(policy, abs=1e-6)
    assert out.value_loss == pytest.approx(value, abs=1e-6)
    assert out.loss.item() == pytest.approx(policy + 0.1 * value, abs=1e-6)
    assert out.clip_fraction == pytest.approx(clipped / 5) and clipped == 2
    assert out.value_clip_fraction == pytest.approx(2 / 5)


@pytest.mark.slow
def test_a_ppo_run_trains_its_value_head_and_resumes_exactly(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """LoRA PPO through the trainer (2 samples per prompt, KL penalty to the adapters-off
    reference): policy and value losses in metrics.jsonl, the adapter without the value head;
    stopped after 2 steps and resumed, it samples and updates exactly as the uninterrupted run
    (the value head, trained from zero, comes back from the checkpoint: its losses match)."""
    ppo = ["--finetune.method=ppo", "--grpo.group_size=2", "--ppo.kl_coef=0.1"]
    whole = tmp_path / "whole"
    align(grpo_config(base, prompts, whole, *ppo))
    steps = [r for r in records(whole) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert {"policy_loss", "value_loss", "clip_fraction", "value_clip_fraction"} <= set(r)
        assert r["loss"] == pytest.approx(r["policy_loss"] + 0.1 * r["value_loss"], rel=1e-4)
        assert {"reward", "reward_digits", "completion_tokens", "rollout_tokens_per_s"} <= set(r)
    from safetensors.torch import load_file

    adapter = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)  # the value head stays in the run

    resumed = tmp_path / "resumed"
    align(grpo_config(base, prompts, resumed, *ppo, "--train.steps=2"))
    align(grpo_config(base, prompts, resumed, *ppo))
    again = {r["step"]: r for r in records(resumed) if "loss" in r}
    for r in steps:
        for key in ("loss", "value_loss", "reward", "completion_tokens"):
            assert again[r["step"]][key] == pytest.approx(r[key], abs=1e-6), (r["step"], key)


@pytest.mark.slow
def test_grpo_on_two_fsdp_ranks_matches_one_process(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """LoRA GRPO with FSDP over 2 processes (each samples its prompts on a copy gathered from
    the sharded policy every step; a prompt's samples are seeded by the prompt, not the rank)
    trains as one process does: the same losses, rewards and adapter (per-completion loss
    means, so each rank's mean weighs as much as the other's)."""
    common = ["--grpo.loss=grpo", "--train.eval_interval=0", "--checkpoint.interval=100"]
    single = tmp_path / "single"
    align(grpo_config(base, prompts, single, *common))
    sharded = tmp_path / "fsdp"
    launch(prompts, ["--nproc", "2"], [*grpo_flags(base, prompts, sharded), *common])
    ours = {r["step"]: r for r in records(sharded) if "loss" in r}
    theirs = {r["step"]: r for r in records(single) if "loss" in r}
    assert ours.keys() == theirs.keys() == {1, 2, 3, 4}
    for step, r in theirs.items():
        for key in ("loss", "reward", "completion_tokens"):
            assert ours[step][key] == pytest.approx(r[key], abs=1e-5), (step, key)
    from safetensors.torch import load_file

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(sharded / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_full_ppo_on_two_fsdp_ranks_matches_one_process_accumulating(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """Full-weight PPO (the value head sharded with the policy, a frozen reference copy,
    unwhitened advantages) over 2 FSDP ranks trains as one process accumulating the same two
    micro-batches: a prompt's samples are seeded by the prompt and how often its step drew
    it, not by rank or micro-step. The run's model loads back without its value head."""
    common = [
        "--finetune.method=ppo",
        "--grpo.lora=false",
        "--grpo.group_size=2",
        "--ppo.kl_coef=0.1",
        "--ppo.whiten_advantages=false",
        "--optimizer.lr=1e-4",
        "--train.steps=3",
        "--optimizer.decay_steps=3",
        "--train.eval_interval=0",
        "--checkpoint.interval=100",
    ]
    single = tmp_path / "single"
    align(grpo_config(base, prompts, single, *common, "--train.micro_batch_size=1"))
    sharded = tmp_path / "fsdp"
    launch(prompts, ["--nproc", "2"], [*grpo_flags(base, prompts, sharded), *common])
    ours = {r["step"]: r for r in records(sharded) if "loss" in r}
    theirs = {r["step"]: r for r in records(single) if "loss" in r}
    assert ours.keys() == theirs.keys() == {1, 2, 3}
    for step, r in theirs.items():
        for key in ("loss", "policy_loss", "value_loss", "reward", "completion_tokens"):
            assert ours[step][key] == pytest.approx(r[key], abs=1e-5), (step, key)
    assert abs(theirs[1]["kl"]) < 1e-6 < abs(theirs[3]["kl"])  # (the policy starts as the ref.)
    assert theirs[3]["value_loss"] != theirs[1]["value_loss"]  # the head trains
    a, _ = load_model(single, torch.float32, tmp_path)
    b, _ = load_model(sharded, torch.float32, tmp_path)
    assert not hasattr(a, "value_head")
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) < 1e-5
    original, _ = load_model(base, torch.float32, tmp_path)
    assert (sa["lm_head.weight"] - original.state_dict()["lm_head.weight"]).abs().max() > 0


@pytest.mark.slow
def test_a_grpo_run_killed_mid_run_resumes_to_the_same_result(
    base: Path, prompts: Path, tmp_path: Path
) -> None:
    """SIGKILLed at the start of step 3 (torchrun's agent restarts it), a GRPO run resumes from
    its step-2 checkpoint and ends where the uninterrupted run ends: the same losses, rewards
    and adapter (its samplers are seeded by step and prompt, so the redone step samples the
    same completions)."""
    whole = tmp_path / "whole"
    align(grpo_config(base, prompts, whole))
    killed = tmp_path / "killed"
    launcher = ["--nproc", "1", "--max-restarts", "1"]
    done = launch(prompts, launcher, grpo_flags(base, prompts, killed), LOOM_FAULTS="kill@3")
    assert "resumed from" in done.stderr + done.stdout
    ours = {r["step"]: r for r in records(killed) if "loss" in r}  # (the redone steps' last)
    theirs = {r["step"]: r for r in records(whole) if "loss" in r}
    assert ours.keys() == theirs.keys() == {1, 2, 3, 4}
    for step, r in theirs.items():
        for key in ("loss", "reward", "completion_tokens"):
            assert ours[step][key] == pytest.approx(r[key], abs=1e-6), (step, key)
    from safetensors.torch import load_file

    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_a_nan_grpo_step_is_skipped_and_training_continues(
    base: Path, prompts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's guard works for GRPO too: step 2's loss and gradients made NaN, the
    update is skipped, the rest trains on finite weights."""
    monkeypatch.setenv("LOOM_FAULTS", "nan@2")
    run = tmp_path / "run"
    align(grpo_config(base, prompts, run, "--train.eval_interval=0"))
    steps = {r["step"]: r for r in records(run) if "loss" in r}
    assert math.isnan(steps[2]["loss"]) and steps[2]["skipped_steps"] == 1
    assert all(math.isfinite(steps[s]["loss"]) for s in (1, 3, 4))
    from safetensors.torch import load_file

    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())
