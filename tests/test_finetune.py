"""`loom finetune`: LoRA adapters that real PEFT reads with the same logits, merge, packing
that never attends across examples, exact resume, FSDP = one process, QLoRA, DPO, reward models
(TRL's loss, transformers' scores, `loom eval`'s pairwise accuracy), bad input.

A tiny random Llama (saved by transformers) with SmolLM2's real tokenizer and chat template,
trained on questions about standard-library functions answered by their docstrings."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import SMOLLM2_VOCAB, save_tiny_llama

from loom.cli import main as loom
from loom.core.errors import LoomError
from loom.core.lora import base_weight_bytes, lora_layers
from loom.eval.generate import generate, generate_text
from loom.finetune.config import FinetuneConfig, load_finetune_config
from loom.finetune.distill import distill_loss
from loom.finetune.docstrings import build_docstring_dataset
from loom.finetune.rows import row_tensors
from loom.finetune.sft_data import Rows, build_preferences, build_sft
from loom.finetune.trainer import Finetuning, finetune, finetune_trainer
from loom.models.convert import write_hf
from loom.models.hf import load_hf_model
from loom.models.llama import build_model
from loom.models.sources import find_checkpoint, load_checkpoint_model
from loom.parallel.recompute import clean_name
from loom.serve.engine import SamplingParams, Sequence
from loom.serve.server import ServeOptions, build_engine
from loom.train.trainer import Trainer

SEQ = 128


@pytest.fixture(scope="module")
def base(smollm2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama in HF format with SmolLM2's tokenizer files."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    save_tiny_llama(folder, smollm2_tokenizer, 256, SMOLLM2_VOCAB, intermediate=128, tied=True)
    return folder


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 training and 12 validation questions about standard-library functions."""
    out = tmp_path_factory.mktemp("pydoc")
    data = build_docstring_dataset(out / "all")
    for name, count in (("train", 60), ("val", 12)):
        path = data.train_path if name == "train" else data.val_path
        lines = path.read_text().splitlines()[:count]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def config(base: Path, pydoc: Path, run_dir: Path, *overrides: str) -> FinetuneConfig:
    return load_finetune_config(
        None,
        [
            f"--model.path={base}",
            f"--data.path={pydoc / 'train.jsonl'}",
            f"--data.val_path={pydoc / 'val.jsonl'}",
            f"--run_dir={run_dir}",
            "--train.steps=6",
            "--train.batch_size=4",
            f"--train.seq_len={SEQ}",
            "--train.eval_interval=0",
            "--optimizer.lr=1e-2",
            "--optimizer.warmup_steps=0",
            "--optimizer.decay_steps=8",  # one schedule, however many steps a call runs
            "--checkpoint.interval=3",
            "--metrics.log_interval=1",
            "--metrics.progress=plain",
            "--metrics.tensorboard=false",
            *overrides,
        ],
    )


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def real_ids(base: Path) -> torch.Tensor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    text = "Question: what does json.dumps do? It serializes an object to a JSON string."
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.slow
def test_lora_adapter_loads_in_peft_with_the_same_logits_and_merges(
    base: Path, pydoc: Path, tmp_path: Path
) -> None:
    run = tmp_path / "lora"
    result = finetune(config(base, pydoc, run, "--lora.rank=4", "--lora.alpha=8"))
    assert result.step == 6 and result.val_losses[6] < result.val_losses[0] - 0.1
    adapter = run / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and len(saved["target_modules"]) == 7

    # Only the adapters trained: the base weights in the run equal the HF folder's.
    model = load_checkpoint_model(run / "checkpoints" / "latest", "cpu", tmp_path)
    hf_base = load_hf_model(base)
    for name, layer in lora_layers(model):
        assert torch.equal(layer.weight, hf_base.get_parameter(f"{name}.weight"))
        assert layer.lora_B.weight.abs().max() > 0, f"{name} did not train"

    ids = real_ids(base)
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(reference, adapter).eval()
    with torch.no_grad():
        ours, theirs = model(ids), with_adapter(ids).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    assert (theirs - plain).abs().max() > 1e-2  # the adapter changes the outputs

    assert loom(["convert", str(run), "--out", str(tmp_path / "plain"), "--format", "hf"]) == 2
    merged_dir = tmp_path / "merged"
    assert loom(["convert", str(run), "--out", str(merged_dir), "--format", "hf", "--merge"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        assert (merged(ids).logits - theirs).abs().max() < 1e-4


@pytest.mark.slow
def test_packed_rows_give_the_loss_of_the_examples_one_by_one(base: Path, pydoc: Path) -> None:
    """Document masks: a packed row's token losses equal those of its examples run alone."""
    options = {"val_fraction": 0.0, "seed": 0}
    packed = build_sft(pydoc / "train.jsonl", base, 2 * SEQ, packing=True, **options).train
    alone_rows = build_sft(pydoc / "train.jsonl", base, 2 * SEQ, packing=False, **options).train
    assert len(packed) < len(alone_rows) / 2  # several examples share a row
    model = load_hf_model(base)

    def token_losses(rows: Rows, use_docs: bool) -> torch.Tensor:
        with torch.no_grad():
            logits = model(rows.inputs, doc_ids=rows.doc_ids.long() if use_docs else None)
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), rows.targets.flatten(), reduction="none"
        )
        return loss[rows.targets.flatten() != -100]

    masked, alone = token_losses(packed, True), token_losses(alone_rows, False)
    assert len(masked) == len(alone)
    assert masked.sum().item() == pytest.approx(alone.sum().item(), rel=1e-5)
    assert torch.allclose(masked.sort().values, alone.sort().values, atol=1e-4)
    leaky = token_losses(packed, False)  # without the masks, examples see each other
    assert (leaky.sort().values - alone.sort().values).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_exactly(method: str, base: Path, pydoc: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    finetune(config(base, pydoc, straight, f"--finetune.method={method}"))
    resumed = tmp_path / "resumed"
    finetune(config(base, pydoc, resumed, f"--finetune.method={method}", "--train.steps=3"))
    finetune(config(base, pydoc, resumed, f"--finetune.method={method}"))
    assert losses(resumed) == losses(straight)
    if method == "lora":  # adapter checkpoints hold only what trains
        files = (resumed / "checkpoints" / "latest" / ".metadata").read_bytes()
        assert b"lora_A" in files and b"embed_tokens" not in files


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        [],
        # each packed row split over 2 ranks: document masks per chunk pair, and the loss
        # token-weighted over the ranks (their shares hold different numbers of targets)
        ["--parallel.cp=2", "--parallel.dp_shard=1", "--train.batch_size=2"],
    ],
    ids=["fsdp2", "cp2_packed"],
)
def test_lora_under_fsdp_matches_one_process(
    base: Path, pydoc: Path, tmp_path: Path, layout: list[str]
) -> None:
    single = tmp_path / "single"
    batch = [arg for arg in layout if arg.startswith("--train.batch_size")]
    finetune(config(base, pydoc, single, "--train.steps=4", *batch))
    sharded = tmp_path / "fsdp"
    toml = tmp_path / "ft.toml"
    toml.write_text(
        f'run_dir = "{sharded}"\n[model]\npath = "{base}"\n'
        f'[data]\npath = "{pydoc / "train.jsonl"}"\nval_path = "{pydoc / "val.jsonl"}"\n'
    )
    args = [
        "--train.steps=4",
        "--train.batch_size=4",
        f"--train.seq_len={SEQ}",
        *layout,
        "--train.eval_interval=0",
        "--optimizer.lr=1e-2",
        "--optimizer.warmup_steps=0",
        "--optimizer.decay_steps=8",
        "--checkpoint.interval=3",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
    ]
    command = [sys.executable, "-m", "loom", "finetune", str(toml), "--nproc", "2", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = losses(sharded), losses(single)
    assert ours.keys() == theirs.keys()
    for step in ours:
        assert ours[step] == pytest.approx(theirs[step], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(sharded / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_qlora_stores_the_base_in_nf4_and_trains_the_adapters(
    base: Path, pydoc: Path, tmp_path: Path
) -> None:
    # Blocks of 64 weights: a width-64 model quantizes every projection.
    trainer = finetune_trainer(config(base, pydoc, tmp_path / "q", "--finetune.method=qlora"))
    model = trainer.model.parts[0]
    layers = dict(lora_layers(model))
    assert len(layers) == 14
    assert all(type(layer.weight).__name__ == "NF4Tensor" for layer in layers.values())
    projections = sum(layer.weight.numel() for layer in layers.values())
    nf4_bytes = base_weight_bytes(model) - 4 * (model.cfg.num_params() - projections)
    assert 0.5 <= nf4_bytes / projections < 0.6  # 4 bits + double-quantized block scales
    # The dequantized weights stay close to the originals (NF4 keeps ~ 9 % relative error).
    original = load_hf_model(base)
    for name, layer in layers.items():
        exact = original.get_parameter(f"{name}.weight")
        error = (layer.weight.get_original_weight() - exact).norm() / exact.norm()
        assert error < 0.15, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    # MFU counts 4 FLOPs per frozen matmul weight (no weight gradients), 6 per adapter weight.
    per_block = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o, gate, up, down
    matmul = 2 * per_block + 49152 * 64  # the tied embedding is the output projection
    adapters = 2 * 8 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    attention = 12 * 2 * 64 * SEQ
    assert trainer.flops_per_token == 4 * matmul + attention + 6 * adapters
    result = trainer.run()
    assert all(math.isfinite(v) for v in result.train_losses.values())
    assert losses(tmp_path / "q")[6] < losses(tmp_path / "q")[1]
    assert (tmp_path / "q" / "adapter" / "adapter_model.safetensors").is_file()


def preferences(pydoc: Path, out: Path, count: int) -> Path:
    """Chosen: the function's own docstring answer; rejected: another function's."""
    lines = (pydoc / "train.jsonl").read_text().splitlines()[:count]
    records = [json.loads(line) for line in lines]
    with out.open("w") as fh:
        for i, record in enumerate(records):
            question, answer = (m["content"] for m in record["messages"])
            other = records[(i + 7) % len(records)]["messages"][1]["content"]
            fh.write(json.dumps({"prompt": question, "chosen": answer, "rejected": other}) + "\n")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("adapters", ["true", "false"])
def test_dpo_starts_at_log2_and_learns_the_preference(
    adapters: str, base: Path, pydoc: Path, tmp_path: Path
) -> None:
    data = preferences(pydoc, tmp_path / "pref.jsonl", 8)  # seen 5 times in 10 steps
    run = tmp_path / "dpo"
    result = finetune(
        config(
            base,
            pydoc,
            run,
            "--finetune.method=dpo",
            f"--dpo.lora={adapters}",
            f"--data.path={data}",
            f"--data.val_path={data}",  # the pairs it trains on: does it learn them?
            "--dpo.beta=0.5",
            "--optimizer.lr=3e-3" if adapters == "true" else "--optimizer.lr=2e-4",
            "--train.steps=10",
            "--optimizer.decay_steps=10",
        )
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, records = records[0], records[1:]
    assert before["step"] == 0 and before["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert before["val_reward_accuracy"] == 0
    # Policy = reference before the first update: every pair's margin is 0, the loss log 2.
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    last = records[-1]  # validation on all 8 pairs after training
    assert result.val_losses[10] < math.log(2) - 0.03
    assert last["val_reward_accuracy"] >= 0.75 and last["val_reward_margin"] > 0
    assert (run / "adapter").is_dir() == (adapters == "true")


def whole_sequence(inputs: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """A preference row's tokens: its inputs through the last trained target, and that target."""
    last = int((targets != -100).nonzero().max())
    return [*inputs[: last + 1].tolist(), int(targets[last])]


def test_reward_model_loss_and_gradients_equal_trl(base: Path, pydoc: Path, tmp_path: Path) -> None:
    """A reward model's Bradley–Terry loss (with TRL's reward centring) on a fixed batch of
    pairs equals TRL's RewardTrainer on transformers' reward model holding the same weights
    (written by Loom's HF export), and so do the gradients."""
    import trl
    from datasets import Dataset

    data = preferences(pydoc, tmp_path / "pref.jsonl", 8)
    centred = "--reward.center_rewards_coefficient=0.01"
    method, paths = "--finetune.method=reward", [f"--data.path={data}", f"--data.val_path={data}"]
    ft = config(base, pydoc, tmp_path / "rm", method, *paths, centred)
    finetuning = Finetuning(ft)
    trainer = Trainer(finetuning.config, finetuning.task())
    assert finetuning.pairs is not None
    rows = trainer.loader.rows
    batch = row_tensors(rows, torch.arange(4), packed=False)
    losses, chosen, rejected = finetuning.pairs.pairs(trainer, batch)
    losses.mean().backward()
    model = trainer.model.parts[0]
    assert model.lm_head.weight.shape == (1, 64) and model.cfg.num_labels == 1

    plain = build_model(model.cfg, "cpu")
    plain.load_state_dict({clean_name(k): v for k, v in model.state_dict().items()})
    (tmp_path / "hf").mkdir()
    write_hf(plain, base, tmp_path / "hf", "fp32")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        report_to="none",
        center_rewards_coefficient=0.01,
        bf16=False,
        use_cpu=True,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    pairs = Dataset.from_list([{"chosen": "yes", "rejected": "no"}])
    peer = trl.RewardTrainer(hf, args=args, train_dataset=pairs, processing_class=tokenizer)
    c_in, c_tg, r_in, r_tg = batch
    examples = [
        {
            "chosen_ids": whole_sequence(c_in[i], c_tg[i]),
            "rejected_ids": whole_sequence(r_in[i], r_tg[i]),
        }
        for i in range(4)
    ]
    # transformers scores each row at its last token that is not padding: Loom at its last token
    pad = hf.config.pad_token_id
    assert all(e["chosen_ids"][-1] != pad and e["rejected_ids"][-1] != pad for e in examples)
    inputs = peer.data_collator(examples)
    hf.train()
    expected = peer.compute_loss(hf, inputs)
    expected.backward()
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-5)
    rewards = hf(**inputs).logits.squeeze(-1).detach()
    assert torch.allclose(torch.cat([chosen, rejected]), rewards, atol=1e-5)
    grads = {clean_name(n): p.grad for n, p in model.named_parameters()}
    assert torch.allclose(grads["lm_head.weight"], hf.score.weight.grad, atol=1e-5)
    for name in (
        "layers.0.self_attn.q_proj.weight",
        "layers.1.mlp.down_proj.weight",
        "norm.weight",
    ):
        assert torch.allclose(grads[name], hf.get_parameter(f"model.{name}").grad, atol=1e-5)
    # (transformers' embedding takes pad_token_id as padding_idx: that row gets no gradient,
    # though <|im_end|>, SmolLM2's pad token, is a real token of every conversation)
    embedding = hf.model.embed_tokens.weight.grad
    others = torch.arange(len(embedding)) != pad
    assert torch.allclose(grads["embed_tokens.weight"][others], embedding[others], atol=1e-5)


UNHELPFUL = ["I don't know.", "Look it up yourself.", "No idea, sorry.", "Why do you ask?"]


def unhelpful_rejected(pydoc: Path, out: Path, lines: range) -> Path:
    """Chosen: the function's own docstring answer; rejected: an unhelpful reply."""
    records = [
        json.loads(line) for line in (pydoc / "all" / "train.jsonl").read_text().splitlines()
    ]
    with out.open("w") as fh:
        for i in lines:
            question, answer = (m["content"] for m in records[i]["messages"])
            pair = {"prompt": question, "chosen": answer, "rejected": UNHELPFUL[i % 4]}
            fh.write(json.dumps(pair) + "\n")
    return out


@pytest.mark.slow
def test_reward_model_learns_and_scores_alike_in_eval_and_transformers(
    base: Path, pydoc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reward model trained on 24 pairs ranks 12 held-out ones; `loom eval` reports the
    trainer's own pairwise accuracy for the run and for its HF export, whose scores
    transformers' reward model reproduces; it cannot generate, nor be fine-tuned as an LM."""
    data = unhelpful_rejected(pydoc, tmp_path / "pref.jsonl", range(0, 24))
    held_out = unhelpful_rejected(pydoc, tmp_path / "held_out.jsonl", range(40, 52))
    run = tmp_path / "rm"
    finetune(
        config(
            base,
            pydoc,
            run,
            "--finetune.method=reward",
            f"--data.path={data}",
            f"--data.val_path={held_out}",
            "--optimizer.lr=1e-3",
            "--train.steps=10",
            "--optimizer.decay_steps=10",
        )
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    before, last = records[0], records[-1]
    assert before["step"] == 0 and last["step"] == 10
    assert last["val_loss"] < before["val_loss"] / 2  # on held-out pairs
    assert last["val_reward_accuracy"] == 1.0
    assert last["val_reward_margin"] > before["val_reward_margin"] + 1

    capsys.readouterr()
    assert loom(["eval", str(run), "--tasks", str(held_out), "--json"]) == 0
    task = json.loads(capsys.readouterr().out)["tasks"]["held_out.jsonl"]
    assert task["kind"] == "preference" and task["n"] == 12
    assert task["accuracy"] == pytest.approx(last["val_reward_accuracy"])
    assert task["margin"] == pytest.approx(last["val_reward_margin"], abs=1e-5)

    hf_dir = tmp_path / "hf"
    assert loom(["convert", str(run), "--out", str(hf_dir), "--format", "hf"]) == 0
    assert loom(["eval", str(hf_dir), "--tasks", str(held_out), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)["tasks"]["held_out.jsonl"]
    assert exported["margin"] == pytest.approx(task["margin"], abs=1e-5)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    rows = build_preferences(held_out, base, SEQ - 1, val_fraction=0.0).train
    loom_model = load_checkpoint_model(find_checkpoint(run)[0], "cpu", tmp_path)
    for i in range(2):
        ids = torch.tensor([whole_sequence(rows.chosen.inputs[i], rows.chosen.targets[i])])
        with torch.no_grad():
            expected = hf(ids).logits[0, 0]
            assert loom_model(ids)[0, -1, 0] == pytest.approx(expected.item(), abs=1e-5)

    with pytest.raises(LoomError, match="is a reward model"):
        generate_text(run, "What does json.dumps do?")
    with pytest.raises(LoomError, match="finetune.method=reward"):
        finetune(config(hf_dir, pydoc, tmp_path / "sft"))


@pytest.mark.slow
def test_a_language_model_ranks_pairs_by_the_answers_log_probability(
    base: Path, pydoc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loom eval` on preference pairs with a language model: each pair's margin is the
    chosen answer's summed log-probability minus the rejected one's, as transformers gives."""
    data = preferences(pydoc, tmp_path / "pref.jsonl", 4)
    assert loom(["eval", str(base), "--tasks", str(data), "--json"]) == 0
    task = json.loads(capsys.readouterr().out)["tasks"]["pref.jsonl"]
    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    rows = build_preferences(data, base, 255, val_fraction=0.0).train
    margins = []
    for i in range(4):
        logps = []
        for side in (rows.chosen, rows.rejected):
            inputs, targets = side.inputs[i : i + 1], side.targets[i : i + 1]
            with torch.no_grad():
                logp = model(inputs).logits.log_softmax(-1)
            picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            logps.append(float(picked[targets != -100].sum()))
        margins.append(logps[0] - logps[1])
    assert task["margin"] == pytest.approx(sum(margins) / 4, abs=1e-4)
    assert task["accuracy"] == sum(m > 0 for m in margins) / 4


def test_bad_input_is_refused_before_training(base: Path, pydoc: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(LoomError, match="model.path .* does not exist"):
        config(tmp_path / "nowhere", pydoc, run)
    with pytest.raises(LoomError, match="finetune.method must be one of"):
        config(base, pydoc, run, "--finetune.method=prefix")
    with pytest.raises(LoomError, match="lora.targets"):
        config(base, pydoc, run, "--lora.targets=q_proj,attn")
    with pytest.raises(LoomError, match="parallel.tp > 1"):
        config(base, pydoc, run, "--parallel.tp=2")
    with pytest.raises(LoomError, match="qlora runs in one process"):
        config(base, pydoc, run, "--finetune.method=qlora", "--parallel.dp_shard=2")
    with pytest.raises(LoomError, match="memory.offload=none or finetune.method=lora"):
        config(base, pydoc, run, "--finetune.method=qlora", "--memory.offload=params")
    with pytest.raises(LoomError, match="needs a teacher: set distill.teacher"):
        config(base, pydoc, run, "--finetune.method=distill")
    with pytest.raises(LoomError, match="distill.alpha=2.0 must be in"):
        config(
            base,
            pydoc,
            run,
            "--finetune.method=distill",
            f"--distill.teacher={base}",
            "--distill.alpha=2",
        )
    with pytest.raises(LoomError, match="exceeds the base model's context of 256"):
        finetune_trainer(config(base, pydoc, run, "--train.seq_len=512"))
    # Malformed lines are counted in the run's data report, the good ones train.
    broken = tmp_path / "broken.jsonl"
    good = (pydoc / "train.jsonl").read_text().splitlines()
    broken.write_text("\n".join([*good[:20], "{not json", '{"text": "no shape"}', *good[20:]]))
    finetune(config(base, pydoc, run, f"--data.path={broken}", "--train.steps=1"))
    report = json.loads((run / "data_report.json").read_text())
    assert report["malformed"] == 2 and report["train_examples"] == 60
    assert not any(p.name == "nowhere" for p in tmp_path.iterdir())


def test_distillation_loss_is_the_tempered_kl_and_the_data_loss() -> None:
    """(1 − α)·T²·KL(teacher_T ‖ student_T) + α·CE over the trained targets only, written
    out with torch's own kl_div and cross_entropy."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = -100
    loss, kl, ce = distill_loss(student, teacher, targets, 2.0, 0.25)
    keep = targets != -100
    s = torch.log_softmax(student[keep] / 2, -1)
    t = torch.log_softmax(teacher[keep] / 2, -1)
    want_kl = torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
    want_ce = torch.nn.functional.cross_entropy(student[keep], targets[keep])
    assert kl.item() == pytest.approx(want_kl.item(), rel=1e-5)
    assert ce.item() == pytest.approx(want_ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.75 * 4 * want_kl.item() + 0.25 * want_ce.item(), rel=1e-5)
    assert distill_loss(teacher, teacher, targets, 2.0, 0.0)[0].item() == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_distillation_brings_the_student_to_its_teacher(
    base: Path, pydoc: Path, tmp_path: Path
) -> None:
    """A fully fine-tuned run as the teacher, its base as the student: distilled for 8 steps,
    the student's KL to the teacher on the held-out answers falls by more than half, in the
    run's metrics and computed here from the saved student on the raw validation text."""
    teacher = tmp_path / "teacher"
    finetune(config(base, pydoc, teacher, "--finetune.method=full", "--train.steps=8"))
    student = tmp_path / "student"
    distill = [
        "--finetune.method=distill",
        f"--distill.teacher={teacher}",
        "--distill.temperature=2",
        "--train.steps=8",
        "--train.eval_interval=8",
        "--optimizer.decay_steps=8",
    ]
    finetune(config(base, pydoc, student, *distill))
    records = [json.loads(x) for x in (student / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in records if "val_kl" in r}
    assert set(val) == {0, 8} and val[8]["val_kl"] < 0.5 * val[0]["val_kl"]
    assert all({"kl", "ce"} <= set(r) for r in records if "loss" in r)

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    text = (pydoc / "val.jsonl").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :SEQ]
    reference = load_checkpoint_model(find_checkpoint(teacher)[0], "cpu", tmp_path)

    def kl_to_teacher(model: torch.nn.Module) -> float:
        with torch.no_grad():
            t = torch.log_softmax(reference(ids), -1)
            return (t.exp() * (t - torch.log_softmax(model(ids), -1))).sum(-1).mean().item()

    before = kl_to_teacher(load_hf_model(base, "cpu", torch.float32))
    after = kl_to_teacher(load_checkpoint_model(find_checkpoint(student)[0], "cpu", tmp_path))
    assert after < 0.5 * before, (before, after)


def test_generate_from_a_lora_run(
    base: Path, pydoc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "lora"
    finetune(config(base, pydoc, run, "--train.steps=1"))
    assert loom(["generate", str(run), "--prompt", "json", "--max-tokens", "3", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("json")

    # Served merged (the run as the model) or as an adapter chosen by name over the base:
    # the greedy answer of the unmerged run either way.
    model = load_checkpoint_model(run / "checkpoints" / "latest", "cpu", tmp_path)
    ids = real_ids(base)[0].tolist()
    expected = generate(model, ids, 6, temperature=0)
    for src, opts, name in (
        (run, ServeOptions(kv_cache_mb=8), None),
        (base, ServeOptions(kv_cache_mb=8, adapters={"tuned": str(run)}), "tuned"),
    ):
        engine, served, _ = build_engine(src, opts, tmp_path / "scratch")
        adapter = served.adapters[name] if name else -1
        seq = Sequence(ids, SamplingParams(max_tokens=6, temperature=0), lambda e: None, adapter)
        engine.submit([seq])
        while engine.has_work():
            engine.step()
        assert seq.output_ids == expected


def test_the_demo_config_validates(base: Path, pydoc: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    cfg = load_finetune_config(
        repo / "configs" / "finetune-smollm2.toml",
        [
            f"--model.path={base}",
            f"--data.path={pydoc / 'train.jsonl'}",
            f"--data.val_path={pydoc / 'val.jsonl'}",
            "--run_dir=unused",
        ],
    )
    assert cfg.finetune.method == "lora" and cfg.uses_lora and cfg.optimizer.lr == 1e-3


def test_lora_on_top_of_a_lora_run(base: Path, pydoc: Path, tmp_path: Path) -> None:
    """A LoRA run as the base: its adapters are merged, the new ones trained and reloaded."""
    first, second = tmp_path / "first", tmp_path / "second"
    finetune(config(base, pydoc, first, "--train.steps=2"))
    finetune(config(base, pydoc, second, "--train.steps=2", f"--model.path={first}"))
    merged_first = tmp_path / "first-hf"
    assert (
        loom(["convert", str(first), "--out", str(merged_first), "--format", "hf", "--merge"]) == 0
    )
    reference = transformers.AutoModelForCausalLM.from_pretrained(merged_first, dtype=torch.float32)
    stacked = peft.PeftModel.from_pretrained(reference, second / "adapter").eval()
    ours = load_checkpoint_model(second / "checkpoints" / "latest", "cpu", tmp_path)
    ids = real_ids(base)
    with torch.no_grad():
        assert (ours(ids) - stacked(ids).logits).abs().max() < 1e-4
    # Resuming with other adapter settings or another base is refused, nothing is touched.
    before = sorted(p.name for p in (second / "checkpoints").iterdir())
    with pytest.raises(LoomError, match="holds a fine-tuning checkpoint"):
        finetune(
            config(
                base, pydoc, second, "--train.steps=3", f"--model.path={first}", "--lora.alpha=32"
            )
        )
    with pytest.raises(LoomError, match="holds a fine-tuning checkpoint"):
        finetune(config(base, pydoc, second, "--train.steps=3"))
    assert sorted(p.name for p in (second / "checkpoints").iterdir()) == before
