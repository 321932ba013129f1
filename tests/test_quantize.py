"""Int8 weight-only quantization (torchao): what is stored, what it costs in quality on the real
SmolLM2-135M-Instruct, and `loom eval --quantize int8` end to end; LoRA and meta models are
refused."""

from __future__ import annotations

import copy
import json
import math
import sysconfig
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TEST_VOCAB
from torch import nn

from loom.cli import main as loom
from loom.core.errors import LoomError
from loom.core.lora import LoRAConfig, apply_lora, merge_lora
from loom.core.quantize import is_quantized, quantize_int8_weight_only, weight_bytes
from loom.core.tokenizer import load_tokenizer
from loom.eval.evaluate import EvalOptions, evaluate, run_task
from loom.eval.tasks import load_task
from loom.models.llama import ModelConfig, Transformer, build_model

TEXT = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
TINY = ModelConfig(
    vocab_size=TEST_VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128
)


def tiny(tie: bool = False, qkv_bias: bool = False) -> Transformer:
    model = build_model(replace(TINY, tie_embeddings=tie, qkv_bias=qkv_bias), "cpu")
    model.init_weights(seed=0)
    return model


def int8_codes(weight: torch.Tensor) -> torch.Tensor:
    """The int8 tensor inside a torchao weight (its flattened inner tensors)."""
    names, _ = weight.__tensor_flatten__()
    inner = [getattr(weight, n) for n in names]
    (codes,) = [t for t in inner if t is not None and t.shape == weight.shape]
    assert codes.dtype == torch.int8
    return codes


def test_linear_weights_become_int8_at_a_quarter_of_the_bytes(
    loom_logs: pytest.LogCaptureFixture,
) -> None:
    model = tiny()
    reference = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    embedding = model.embed_tokens.weight.detach().clone()
    before = weight_bytes(model)
    assert before == 4 * TINY.num_params()

    assert quantize_int8_weight_only(model) == 7 * TINY.n_layers + 1 == len(reference)
    expected = before
    for name, fp32 in reference.items():
        weight = model.get_submodule(name).weight
        assert is_quantized(weight) and weight.shape == fp32.shape
        # One scale per output row, the row's largest weight at code ±127: each weight is
        # off by at most half a step.
        codes = int8_codes(weight)
        assert (codes.short().abs().amax(dim=1) >= 127).all()  # -128 too: in int16
        step = fp32.abs().amax(dim=1, keepdim=True) / 127
        assert ((weight.dequantize() - fp32).abs() <= step / 2 + 1e-7).all()
        out_features, in_features = fp32.shape
        # int8 codes + an fp32 scale and an int8 zero point per row: (in + 5) / (4 · in) of fp32.
        expected += out_features * (in_features + 5) - 4 * fp32.numel()
    assert weight_bytes(model) == expected
    linear_fp32 = 4 * sum(w.numel() for w in reference.values())
    linear_int8 = expected - (before - linear_fp32)
    assert 0.25 < linear_int8 / linear_fp32 < 0.25 * (1 + 5 / TINY.dim) + 1e-9
    assert not is_quantized(model.embed_tokens.weight)
    assert torch.equal(model.embed_tokens.weight, embedding)
    assert f"weights {before / 2**20:.1f} MiB -> {expected / 2**20:.1f} MiB" in loom_logs.text
    assert quantize_int8_weight_only(model) == 0  # already quantized: left alone


def test_tied_output_projection_stays_fp32_and_biases_are_kept() -> None:
    model = tiny(tie=True, qkv_bias=True)
    assert model.lm_head is None
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)  # initialised at zero: make them count
    tokens = torch.randint(0, TEST_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = model(tokens)
    assert quantize_int8_weight_only(model) == 7 * TINY.n_layers
    assert not is_quantized(model.embed_tokens.weight)
    assert not is_quantized(model.layers["0"].self_attn.q_proj.bias)
    with torch.no_grad():
        int8 = model(tokens)
    assert int8.shape == (2, 16, TEST_VOCAB) and not torch.equal(int8, fp32)
    assert (int8 - fp32).norm() / fp32.norm() < 0.02


class Wrapped(nn.Module):
    """A layer that holds a projection's weight itself (as serving's multi-adapter layer does)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.weight = base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight)


def test_wrapped_projections_are_named_not_skipped_silently(
    loom_logs: pytest.LogCaptureFixture,
) -> None:
    model = tiny()
    attn = model.layers["1"].self_attn
    attn.q_proj = Wrapped(attn.q_proj)
    assert quantize_int8_weight_only(model) == 7 * TINY.n_layers
    assert not is_quantized(attn.q_proj.weight)
    assert "1 layer(s) hold a matrix weight but are not nn.Linear" in loom_logs.text
    assert "layers.1.self_attn.q_proj (Wrapped)" in loom_logs.text


def test_lora_and_meta_models_are_refused() -> None:
    model = tiny()
    apply_lora(model, LoRAConfig(rank=4))
    with pytest.raises(LoomError, match="LoRA layer.*merge_lora"):
        quantize_int8_weight_only(model)
    assert not any(is_quantized(p) for p in model.parameters())  # refused before any change
    merge_lora(model)
    assert quantize_int8_weight_only(model) == 7 * TINY.n_layers + 1

    with pytest.raises(LoomError, match="meta device"):
        quantize_int8_weight_only(build_model(TINY))


# -- the real SmolLM2-135M-Instruct -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(
    smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Transformer, Transformer, Path, Path]:
    """SmolLM2 in fp32, an int8 copy of it, its tokenizer folder, and the fp32 model written as
    a Loom run (`loom eval` on it appends to eval.jsonl, and it loads faster than the GGUF)."""
    from loom.models.convert import write_loom
    from loom.models.sources import load_model

    root = tmp_path_factory.mktemp("smollm2")
    model, tokenizer_dir = load_model(smollm2_gguf, torch.float32, root / "scratch", "cpu")
    (root / "run").mkdir()
    write_loom(model, tokenizer_dir, root / "run", source=str(smollm2_gguf))
    quantized = copy.deepcopy(model)
    assert quantize_int8_weight_only(quantized) == 7 * model.cfg.n_layers  # tied: no lm_head
    return model.eval(), quantized.eval(), tokenizer_dir, root / "run"


@pytest.mark.slow
def test_smollm2_int8_logits_stay_close_to_fp32(smollm2: tuple) -> None:
    model, quantized, tokenizer_dir, _ = smollm2
    ids = load_tokenizer(tokenizer_dir).encode(TEXT, add_special_tokens=False).ids[:256]
    tokens = torch.tensor([ids])
    with torch.no_grad():
        fp32, int8 = model(tokens)[0], quantized(tokens)[0]
    # Measured: 2.3 % relative error (L2 over all logits) and 96 % greedy agreement.
    assert (int8 - fp32).norm() / fp32.norm() < 0.05
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9
    assert not torch.equal(int8, fp32)
    # Resident weights: the 210 projections at ≈ 1/4; the fp32 embedding (tied) stays as it was.
    embedding = 4 * model.embed_tokens.weight.numel()
    ratio = (weight_bytes(quantized) - embedding) / (weight_bytes(model) - embedding)
    assert 0.25 < ratio < 0.26


@pytest.mark.slow
def test_loom_eval_quantize_int8_perplexity_within_a_few_percent(
    smollm2: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`loom eval RUN --quantize int8` (the command calls `evaluate`) loads SmolLM2 and
    quantizes it: its perplexity is that of the int8 copy scored by the same task code, a little
    above fp32's, never equal; the option is logged in the run's eval.jsonl."""
    model, quantized, tokenizer_dir, run = smollm2
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:3000])
    capsys.readouterr()
    args = ["eval", str(run), "--tasks", str(text), "--seq-len", "256", "--json"]
    assert loom([*args, "--quantize", "int8"]) == 0
    got = json.loads(capsys.readouterr().out)["tasks"]["text.txt"]

    task = load_task(str(text))
    tokenizer = load_tokenizer(tokenizer_dir)
    fp32 = run_task(model, tokenizer, tokenizer_dir, task, EvalOptions(seq_len=256)).metrics
    int8 = run_task(quantized, tokenizer, tokenizer_dir, task, EvalOptions(seq_len=256)).metrics
    assert got["tokens"] == fp32["tokens"] > 500
    assert got["perplexity"] == pytest.approx(int8["perplexity"], rel=1e-5)
    assert got["perplexity"] != fp32["perplexity"]
    assert abs(got["perplexity"] / fp32["perplexity"] - 1) < 0.03  # measured: +0.1 to +0.3 %
    assert math.isfinite(got["bits_per_byte"])
    (logged,) = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert logged["options"]["quantize"] == "int8" and logged["tasks"]["text.txt"] == got


@pytest.mark.slow
def test_bad_quantize_values_are_refused(
    smollm2: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = smollm2[3]
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:300])
    capsys.readouterr()
    assert loom(["eval", str(run), "--tasks", str(text), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--quantize" in err and "int8" in err
    with pytest.raises(LoomError, match="--quantize fp8: the only choice is int8"):
        evaluate(run, [str(text)], EvalOptions(quantize="fp8"))
