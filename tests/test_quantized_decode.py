"""`loom serve --quantize int8|int4`: the packed weights multiply like their dequantized
matrices on every kernel path, a tiny model served quantized decodes like fp32 (in process and
through a real `loom serve`), LoRA adapters keep working over packed bases, GGUF 4-bit blocks
are taken as stored, and bad settings are refused with the fix. No timings are asserted
(benchmarks/quantized_decode.py measures them)."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TEST_VOCAB, save_tiny_llama
from test_serve import peft_adapter
from torch import nn

from loom.core.errors import LoomError
from loom.core.lora import LoRAConfig, apply_lora
from loom.core.quantize import (
    GEMV_MIN_WEIGHTS,
    INT8_PACK_ROWS,
    Int4Weight,
    Int8Weight,
    PackedWeight,
    int4_round,
    quantize_for_serving,
    tensor_bytes,
    weight_bytes,
)
from loom.models.gguf import gguf_int4_codes, q4_blocks
from loom.models.llama import ModelConfig, Transformer, build_model
from loom.serve.adapters import MultiLoRALinear, adapter_layers, select_adapters
from loom.serve.engine import Engine, SamplingParams, Sequence
from loom.serve.server import ServeOptions, build_engine

__all__ = ["peft_adapter"]  # (the fixture, over this module's model)

TINY = ModelConfig(
    vocab_size=TEST_VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128
)
PROMPTS = [[5, 17, 42, 99, 3], [7, 7, 7, 8], [120, 11, 64, 250, 31, 2, 9], [1, 2, 3]]  # tiny()


def tiny(tie: bool = False) -> Transformer:
    model = build_model(replace(TINY, tie_embeddings=tie), "cpu")
    model.init_weights(seed=0)
    return model.eval()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


# -- the kernels ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("out_features", "in_features", "rows", "fp32"),
    [
        # the compiled GEMV (slow: it compiles): `in` not a multiple of 32 (aten is skipped),
        # and a matrix worth its call overhead
        pytest.param(48, 72, 1, True, marks=pytest.mark.slow),
        pytest.param(1024, 576, 1, True, marks=pytest.mark.slow),
        (48, 64, 1, False),  # aten `_weight_int8pack_mm`, bf16 activations
        (48, 64, 8, False),  # the same, several rows
        (48, 72, 8, True),  # the weight converted, fp32 matmul
        (48, 64, INT8_PACK_ROWS + 1, True),  # the same: many rows
    ],
)
def test_int8_linear_is_the_dequantized_matmul_on_every_path(
    out_features: int, in_features: int, rows: int, fp32: bool
) -> None:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    bias = torch.randn(out_features)
    packed = Int8Weight.quantize(weight)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((packed.dequantize() - weight).abs() <= step / 2 + 1e-6).all()
    assert weight.numel() >= GEMV_MIN_WEIGHTS or out_features < 1024  # as the cases say
    x = torch.randn(1, rows, in_features)
    want = F.linear(x, packed.dequantize(), bias)
    got = F.linear(x, packed, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < (1e-5 if fp32 else 1e-2)  # bf16 rounding shows: ≈ 2e-3


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_linear_is_the_dequantized_matmul(group_size: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128)
    codes, scales, zeros = int4_round(weight, group_size)
    assert codes.max() <= 15 and codes.dtype == torch.uint8
    groups = codes.float().view(48, -1, group_size)
    by_hand = ((groups - 8) * scales[..., None] + zeros[..., None]).view(48, 128)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((by_hand - weight).abs() <= step / 2 + 1e-5).all()

    packed = Int4Weight.quantize(weight, group_size)
    # The kernel keeps scales and zeros in bf16: the stored matrix is the rounded one within that.
    assert rel_err(packed.dequantize(), by_hand) < 5e-3
    for rows in (1, 5, 70):
        x = torch.randn(rows, 128)
        assert rel_err(F.linear(x, packed), x @ packed.dequantize().t()) < 1e-2


def test_packed_weights_count_their_bytes_and_refuse_to_expand_silently() -> None:
    weight = torch.randn(32, 64)
    int8, int4 = Int8Weight.quantize(weight), Int4Weight.quantize(weight)
    assert tensor_bytes(int8) == 32 * 64 + 4 * 32  # codes + an fp32 scale per row
    assert tensor_bytes(int4) == 32 * 64 // 2 + 2 * 2 * 32 * 2  # nibbles + bf16 scale, zero
    assert int8.shape == int4.shape == weight.shape and int4.dtype == torch.float32
    assert isinstance(int4.clone(), Int4Weight) and isinstance(int8.detach(), Int8Weight)
    with pytest.raises(LoomError, match="dequantize"):
        int4 + 1
    with pytest.raises(LoomError, match="embedding"):
        F.embedding(torch.tensor([1]), int4)
    ids = torch.tensor([[3, 0, 31]])
    assert torch.equal(F.embedding(ids, int8), F.embedding(ids, int8.dequantize()))


# -- whole models ------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True])
def test_quantize_for_serving_packs_every_matrix_and_keeps_the_logits(tie: bool) -> None:
    model = tiny(tie)
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[2]])
    with torch.no_grad():
        want = model(tokens)
    fp32_bytes = weight_bytes(model)
    for mode, tol, counts in (("int8", 0.03, (15, 0)), ("int4", 0.15, (1, 14))):
        packed = copy.deepcopy(model)
        found = quantize_for_serving(packed, mode)
        assert (found["int8"], found["int4"]) == counts  # the output projection is int8
        matrices = [p for p in packed.parameters() if p.dim() == 2]
        assert all(isinstance(p, PackedWeight) for p in matrices) == tie  # untied: embedding
        assert isinstance(packed.embed_tokens.weight, Int8Weight) == tie
        assert weight_bytes(packed) < fp32_bytes / 2
        with torch.no_grad():
            got = packed(tokens)
            one = packed(tokens[:, :1])  # the one-row (decode) path
        assert rel_err(got, want) < tol
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
        assert rel_err(one[0, 0], want[0, 0]) < tol


def test_int4_layers_the_kernel_cannot_take_fall_back_to_int8() -> None:
    model = tiny()
    model.add_module("extra", nn.Linear(64, 40, bias=False))  # 40 rows: not a multiple of 16
    found = quantize_for_serving(model, "int4")
    assert isinstance(model.extra.weight, Int8Weight)
    assert isinstance(model.layers["0"].mlp.down_proj.weight, Int4Weight)
    assert found["int4"] == 7 * TINY.n_layers


# -- serving -----------------------------------------------------------------------------------


CYCLE, FIRST = 64, 10  # the tiny served model learns: after token FIRST + i comes FIRST + i + 1


def counting(start: int, length: int) -> list[int]:
    return [FIRST + (start + i) % CYCLE for i in range(length)]


@pytest.fixture(scope="module")
def hf_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers Llama trained (≈ 2 s) to count through CYCLE tokens: a random model's
    next-token margins are within int4's rounding, a trained one's are not, so greedy answers
    can be compared token for token."""
    folder = tmp_path_factory.mktemp("quantized") / "tiny-llama"
    model = save_tiny_llama(folder, tokenizer_dir, max_positions=256, intermediate=128)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)  # type: ignore[attr-defined]
    model.train()  # type: ignore[attr-defined]
    for _ in range(150):
        ids = FIRST + (torch.randint(0, CYCLE, (16, 1)) + torch.arange(33)) % CYCLE
        logits = model(ids[:, :-1]).logits  # type: ignore[operator]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    model.eval().save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


def greedy(engine: Engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    engine.stop_ids = set()  # the same length for every variant
    seqs = [
        Sequence(p, SamplingParams(max_tokens=tokens, temperature=0.0), lambda e: None)
        for p in prompts
    ]
    engine.submit(seqs)
    while engine.has_work():
        engine.step()
    return [s.output_ids for s in seqs]


def serve(hf_dir: Path, tmp_path: Path, **options: object) -> tuple[Engine, nn.Module]:
    opts = ServeOptions(kv_cache_mb=4, block_size=4, step_tokens=8, **options)  # type: ignore[arg-type]
    scratch = tmp_path / str(len(list(tmp_path.iterdir())))
    scratch.mkdir()
    engine, _, runner = build_engine(hf_dir, opts, scratch)
    return engine, runner.model  # type: ignore[attr-defined]


COUNTS = [counting(0, 5), counting(30, 3), counting(50, 9), counting(7, 1)]


@pytest.fixture(scope="module")
def served(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[int]]]:
    """Greedy tokens of the engine over fp32, int8 and int4 weights: one sequence at a time
    (the one-row decode path) and all together (several rows per step)."""
    tmp = tmp_path_factory.mktemp("engines")
    out = {}
    for mode in (None, "int8", "int4"):
        engine, _ = serve(hf_dir, tmp, quantize=mode)
        out[mode or "fp32"] = [greedy(engine, [p], 12)[0] for p in COUNTS]
        out[f"{mode or 'fp32'} batched"] = greedy(engine, COUNTS, 12)
    return out


def test_the_engine_over_quantized_weights_decodes_like_fp32(served: dict) -> None:
    fp32 = served["fp32"]
    assert fp32 == [counting(p[-1] + 1 - FIRST, 12) for p in COUNTS]  # it counts on
    for mode in ("int8", "int4"):
        assert served[mode] == fp32, mode  # one sequence: the compiled GEMV / int4 kernel
        assert served[f"{mode} batched"] == fp32, mode  # several rows a step


class Server:
    """A real `loom serve` process (as in test_serve.py), answering through the openai client."""

    def __init__(self, model: Path, *args: str) -> None:
        import httpx
        from conftest import free_port

        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loom", "serve", str(model), "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        import time

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"loom serve exited: {self.process.stdout.read()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("loom serve did not become healthy in 180 s")

    def completion(self, prompt: list[int], tokens: int, model: str) -> tuple[str, int]:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none")
        answer = client.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0
        )
        return answer.choices[0].text, answer.usage.completion_tokens

    def stop(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out


def test_adapters_run_beside_packed_weights(
    hf_dir: Path, peft_adapter: tuple, tmp_path: Path
) -> None:
    folder, tuned = peft_adapter
    tokens = torch.tensor([counting(3, 6) + PROMPTS[0]])
    with torch.no_grad():
        want = tuned(tokens).logits
    for mode, tol in (("int8", 0.03), ("int4", 0.15)):
        _, model = serve(hf_dir, tmp_path, quantize=mode, adapters={"tuned": str(folder)})
        layers = adapter_layers(model)
        assert len(layers) == 3 * 2
        for layer in layers:
            assert isinstance(layer, MultiLoRALinear) and isinstance(layer.weight, PackedWeight)
            assert layer.lora_A_0.dtype == layer.lora_B_0.dtype == torch.float32
        with torch.no_grad():
            select_adapters(layers, torch.zeros(tokens.shape[1], dtype=torch.long))
            adapted = model(tokens)
            select_adapters(layers, None)
            base = model(tokens)
        assert rel_err(adapted, want) < tol
        assert rel_err(base, want) > 3 * rel_err(adapted, want)  # the adapter did apply


def test_loom_serve_quantize_int4_answers_like_the_engine_in_process(
    hf_dir: Path, peft_adapter: tuple, served: dict
) -> None:
    """Through the real server and HTTP: the same greedy tokens as the in-process int4 engine,
    an adapter over the int4 base served by name."""
    from loom.core.tokenizer import load_tokenizer

    server = Server(
        hf_dir, "--quantize", "int4", "--adapter", f"tuned={peft_adapter[0]}", "--block-size", "4"
    )
    try:
        tokenizer = load_tokenizer(hf_dir)
        for prompt, want in zip(COUNTS, served["int4"], strict=True):
            text, count = server.completion(prompt, 12, "tiny-llama")
            assert (text, count) == (tokenizer.decode(want), 12)
        text, count = server.completion(COUNTS[0], 6, "tuned")
        assert count == 6
    finally:
        log = server.stop()
    assert "--quantize int4: 14 int4 matrices" in log


# -- GGUF blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_4_bit_blocks_are_the_int4_format_exactly(kind: str) -> None:
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 96)).astype(np.float32)
    raw = gguf.quants.quantize(weight, qtype)
    codes, scales, zeros = q4_blocks(raw, q4_1=kind == "Q4_1")
    groups = (codes.reshape(16, 3, 32).astype(np.float32) - 8) * scales[..., None]
    assert np.array_equal(
        (groups + zeros[..., None]).reshape(16, 96), gguf.quants.dequantize(raw, qtype)
    )
    packed = Int4Weight.from_codes(
        *(torch.from_numpy(a) for a in (codes, scales, zeros)), 32, torch.float32
    )
    dequantized = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    assert rel_err(packed.dequantize(), dequantized) < 5e-3  # bf16 scales and zeros


@pytest.mark.slow
def test_the_real_q4_1_gguf_is_served_from_its_own_blocks(smollm2_gguf: Path) -> None:
    import gguf

    from loom.models.gguf import _unpermute

    names = {"layers.0.self_attn.q_proj.weight", "layers.3.mlp.down_proj.weight"}
    found = gguf_int4_codes(smollm2_gguf, names)
    assert set(found) == names  # the Q8_0 embedding is not a 4-bit matrix
    reader = gguf.GGUFReader(str(smollm2_gguf))
    tensors = {t.name: t for t in reader.tensors}
    for name, gguf_name, heads in (
        ("layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", 9),
        ("layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", None),
    ):
        t = tensors[gguf_name]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        want = _unpermute(want, heads) if heads else want
        codes, scales, zeros = found[name]
        out_features = codes.shape[0]
        got = (codes.view(out_features, -1, 32).float() - 8) * scales[..., None] + zeros[..., None]
        assert torch.allclose(got.view(out_features, -1), torch.from_numpy(want), atol=1e-6)


# -- refusals ------------------------------------------------------------------------------------


def test_bad_quantize_settings_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="use int8 or int4"):
        ServeOptions(quantize="int3")
    out = subprocess.run(
        [sys.executable, "-m", "loom", "serve", str(tmp_path), "--quantize", "fp8"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "choose from 'int8', 'int4'" in out.stderr
    with pytest.raises(LoomError, match="use one of int8, int4"):
        quantize_for_serving(tiny(), "nf4")
    with pytest.raises(LoomError, match="group size 48"):
        quantize_for_serving(tiny(), "int4", group_size=48)
    lora = tiny()
    apply_lora(lora, LoRAConfig())
    with pytest.raises(LoomError, match="merge the adapters"):
        quantize_for_serving(lora, "int8")
    with pytest.raises(LoomError, match="meta device"):
        quantize_for_serving(build_model(TINY), "int4")
