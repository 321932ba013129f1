"""`loom serve --kv-dtype int8`: keys and values stored as int8 codes with one fp32 scale per
token and head. The same budget holds the expected multiple of blocks; the round trip is within
half a quantization step; attention stays within the error that bound implies; the engine's
logits stay close to the full-precision cache's under chunked prefill, prefix-cache hits and
preemption, and its greedy answers do not depend on either; a draft model's cache, adapters,
the `openai` client and tensor parallelism work over it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEST_VOCAB
from test_serve import (
    KEY,
    PROMPTS,
    Server,
    assert_same_greedy_answers,
    hf_dir,
    hf_greedy,
    peft_adapter,
    reference,
)
from test_serve_engine import CFG, greedy, model, random_prompts, run_all, word_tokenizer

from loom.models.llama import ModelConfig, Transformer, build_model
from loom.serve.engine import Engine, EngineConfig, StepBatch
from loom.serve.kv_cache import (
    SCALE_BYTES,
    PagedKVCache,
    PrefillChunk,
    StepLayout,
    dequantize_kv,
    quantize_kv,
)
from loom.serve.runner import LocalRunner, RunnerSetup, kv_blocks, new_cache
from loom.serve.server import ServeOptions, build_engine

__all__ = ["hf_dir", "model", "peft_adapter", "reference"]  # (fixtures of the modules above)

CPU = torch.device("cpu")
HALF_STEP = 1 / 254  # |x − x̂| ≤ scale / 2 = max|x| / 254 for every element


def cache(m: Transformer, num_blocks: int, kv_dtype: str, block_size: int = 4) -> PagedKVCache:
    c = m.cfg
    return PagedKVCache(
        c.n_layers,
        num_blocks,
        block_size,
        c.n_kv_heads,
        c.attn_head_dim,
        CPU,
        torch.float32,
        kv_dtype,
    )


def test_round_trip_is_within_half_a_step_of_each_vectors_largest_value() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 64, generator=g) * torch.logspace(-3, 2, 64)[:, None, None]
    x[40, 1, 7] = 300.0  # an outlier widens only its own vector's step
    x[5, 2] = 0.0  # an all-zero vector (a padded slot) stays zero
    codes, scale = quantize_kv(x)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == x.shape[:-1]
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127  # symmetric, −128 unused
    back = dequantize_kv(codes, scale, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    err = (back - x).abs()
    assert bool((err <= amax * HALF_STEP * (1 + 1e-5) + 1e-30).all())
    assert float((err / amax.clamp_min(1e-30)).mean()) > HALF_STEP / 4  # it does round
    assert bool((back[5, 2] == 0).all())
    # the outlier's vector is coarse, the other heads of its token are not
    assert float(err[40, 1].max()) > 10 * float(err[40, 0].max())
    # bf16 keys come back as bf16: two more roundings (in and out), each within 2⁻⁸ of a value
    b = dequantize_kv(*quantize_kv(x.bfloat16()), torch.bfloat16)
    assert b.dtype == torch.bfloat16
    assert bool(((b.float() - x).abs() <= amax * (HALF_STEP + 2 * 2**-8) * 1.01).all())


# head_dim 64 (SmolLM2-135M's): an int8 vector is 64 bytes of codes plus a 4-byte scale
WIDE = ModelConfig(
    vocab_size=300, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_budget_holds_more_blocks_by_the_bytes_per_block(dtype: torch.dtype) -> None:
    m = build_model(WIDE, "cpu").to(dtype)
    blocks = {}
    for kv_dtype in ("auto", "int8"):
        setup = RunnerSetup(None, None, 16, 3, 1, kv_dtype=kv_dtype)
        blocks[kv_dtype] = kv_blocks(m, setup, CPU)
        built = new_cache(m, setup, blocks[kv_dtype], CPU)
        # what is allocated is what the budget was divided by, and fits the budget
        per_block = PagedKVCache.bytes_per_block(2, 16, 2, 64, dtype.itemsize, kv_dtype)
        assert built.nbytes == blocks[kv_dtype] * per_block <= 3 * 2**20
        assert blocks[kv_dtype] == 3 * 2**20 // per_block
    head = WIDE.dim // WIDE.n_heads
    expected = head * dtype.itemsize / (head + SCALE_BYTES)  # 3.76× fp32, 1.88× bf16
    assert blocks["int8"] / blocks["auto"] == pytest.approx(expected, rel=0.01)
    assert expected > (3.7 if dtype == torch.float32 else 1.85)


def test_attention_over_int8_keys_and_values_stays_within_the_rounding_bound() -> None:
    """One prompt chunk after cached context and a batch of decodes, against the same cache in
    fp32. Each value moves by ≤ s_v/2 and each score q·k/√d by ≤ δ = ‖q‖₁·max s_k/(2√d), so the
    softmax weights change by a factor within e^{±2δ} and every output element by at most
    max s_v/2 + (e^{2δ} − 1)·max|v| (maxima over the keys of the query's head)."""
    heads, kv_heads, d, bs = 4, 2, 32, 4
    g = torch.Generator().manual_seed(1)
    caches = [PagedKVCache(1, 16, bs, kv_heads, d, CPU, torch.float32, k) for k in ("auto", "int8")]
    t = 30  # tokens: a 22-token context, then 8 prompt tokens as one chunk
    q, k, v = (torch.randn(1, h, t, d, generator=g) * 3 for h in (heads, kv_heads, kv_heads))
    blocks = torch.tensor([7, 2, 9, 4, 11, 0, 5, 13])  # a scattered block table
    slots = blocks[torch.arange(t) // bs] * bs + torch.arange(t) % bs
    empty = torch.zeros(0, dtype=torch.long)

    def layout(start: int, end: int, decode: bool) -> StepLayout:
        if decode:  # every token from 22 on decodes alone against what precedes it
            rows = torch.arange(end - start)
            table = blocks.expand(end - start, -1)
            return StepLayout(slots[start:end], rows, table, torch.arange(start, end) + 1, [])
        chunk = PrefillChunk(0, end - start, start, blocks[: math.ceil(end / bs)])
        return StepLayout(slots[start:end], empty, empty.view(0, 0), empty, [chunk])

    outs = []
    for c in caches:
        c.layout = layout(0, 22, decode=False)
        c.attend(0, q[:, :, :22], k[:, :, :22], v[:, :, :22])
        c.layout = layout(22, t, decode=False)
        chunk = c.attend(0, q[:, :, 22:], k[:, :, 22:], v[:, :, 22:])
        c.layout = layout(22, t, decode=True)  # the same tokens written again, decoded
        decoded = c.attend(0, q[:, :, 22:], k[:, :, 22:], v[:, :, 22:])
        outs.append((chunk, decoded))
    ks, vs = (
        caches[1].key_scales[0].flatten(0, 1)[slots],
        caches[1].value_scales[0].flatten(0, 1)[slots],
    )
    group = heads // kv_heads
    s_k = ks.amax(0).repeat_interleave(group)  # [heads]
    s_v = vs.amax(0).repeat_interleave(group)
    v_max = v[0].abs().amax((1, 2)).repeat_interleave(group)
    delta = q[0, :, 22:].abs().sum(-1) * s_k[:, None] / (2 * math.sqrt(d))  # [heads, 8]
    bound = s_v[:, None, None] / 2 + torch.expm1(2 * delta)[..., None] * v_max[:, None, None]
    for exact, rounded in zip(outs[0], outs[1], strict=True):
        err = (rounded - exact)[0].abs()  # [heads, 8, d]
        assert bool((err <= bound * 1.001).all())
        assert float(err.max()) > 0  # the int8 cache really is another cache
    assert torch.allclose(outs[1][0], outs[1][1], atol=1e-5)  # chunked or decoded: the same


class BothCaches:
    """Runs every step on the model twice, over a full-precision cache and an int8 one (the
    same block ids), records both logits and returns the full-precision ones: the engine
    follows the full-precision greedy path and the int8 logits are compared token for token."""

    def __init__(self, m: Transformer, num_blocks: int) -> None:
        self.exact = LocalRunner(m, cache(m, num_blocks, "auto"))
        self.int8 = LocalRunner(m, cache(m, num_blocks, "int8"))
        self.logits: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: StepBatch) -> torch.Tensor:
        exact, rounded = self.exact.forward(batch), self.int8.forward(batch)
        self.logits.append((exact, rounded))
        return exact


class Hits:
    def __init__(self) -> None:
        self.hit = 0

    def prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.hit += hit_tokens

    def __getattr__(self, name: str) -> object:  # the other metrics: ignored
        return lambda *args: None


def shared_prefix_prompts() -> list[list[int]]:
    """Random prompts, half of them behind one 24-token prefix (prefix-cache hits)."""
    prefix = list(range(40, 64))
    tails = random_prompts(10, 30, seed=4)
    return [prefix + t if i % 2 else t for i, t in enumerate(tails)]


def test_engine_logits_with_an_int8_cache_stay_close_to_full_precision(model: Transformer) -> None:
    """Chunked prefill (16-token steps), a cache of 40 blocks that preempts, prefix-cache hits:
    every logit row of the int8 cache within sqrt(head_dim)/254 (relative L2) of the fp32
    cache's — the most one dequantized key or value can be off (‖x − x̂‖ ≤ √d·max|x|/254 ≤
    √d/254·‖x‖), a bound on how far the keys and values move, not fitted to the result — and
    the same greedy token at ≥ 95 % of the steps."""
    both = BothCaches(model, 40)
    hits = Hits()
    config = EngineConfig(block_size=4, num_blocks=40, max_batch=6, step_tokens=16)
    engine = Engine(both, word_tokenizer(300), set(), CFG.max_seq_len, config, hits)  # type: ignore[arg-type]
    seqs = [greedy(p, 16) for p in shared_prefix_prompts()]
    engine.submit(seqs)
    run_all(engine)
    assert engine.preemptions > 0 and hits.hit >= 4 * 24
    exact = torch.cat([e for e, _ in both.logits])
    rounded = torch.cat([r for _, r in both.logits])
    assert exact.shape[0] == sum(len(s.output_ids) for s in seqs)  # every token compared
    rel = (rounded - exact).norm(dim=-1) / exact.norm(dim=-1)
    head_dim = CFG.dim // CFG.n_heads
    assert float(rel.max()) <= math.sqrt(head_dim) / 254
    assert float(rel.mean()) > 0  # two different caches
    assert float((rounded.argmax(-1) == exact.argmax(-1)).float().mean()) >= 0.95


def test_int8_greedy_answers_do_not_depend_on_chunks_preemption_or_the_prefix_cache(
    model: Transformer,
) -> None:
    """Every key and value is read back from the cache, the chunk's own too, so an int8
    engine that chunks, preempts and reuses cached prefixes gives the tokens of one that
    prefills every prompt in one piece with room to spare; and they mostly equal the
    full-precision cache's."""
    prompts = shared_prefix_prompts()

    def answers(num_blocks: int, kv_dtype: str, **kw: object) -> tuple[list[list[int]], Engine]:
        config = EngineConfig(block_size=4, num_blocks=num_blocks, **kw)  # type: ignore[arg-type]
        engine = Engine(
            LocalRunner(model, cache(model, num_blocks, kv_dtype)),
            word_tokenizer(300),
            set(),
            CFG.max_seq_len,
            config,
        )
        seqs = [greedy(p, 16) for p in prompts]
        engine.submit(seqs)
        run_all(engine)
        return [s.output_ids for s in seqs], engine

    alone, _ = answers(256, "int8", max_batch=10, step_tokens=1024, prefix_cache=False)
    busy, engine = answers(40, "int8", max_batch=6, step_tokens=16)
    assert engine.preemptions > 0 and engine.allocator.num_free == 40
    assert busy == alone
    full, _ = answers(256, "auto", max_batch=10, step_tokens=1024, prefix_cache=False)
    same = sum(a == b for x, y in zip(alone, full, strict=True) for a, b in zip(x, y, strict=True))
    assert same / sum(map(len, full)) >= 0.9


def test_a_draft_models_cache_is_int8_too_and_the_budget_is_split_by_its_bytes(
    hf_dir: Path, tmp_path: Path
) -> None:
    """`--speculate MODEL --kv-dtype int8` with a draft of another shape (1 layer, one
    32-wide key/value head): both caches int8, the budget split by their int8 bytes per
    block (scales included), and the greedy answers those without the draft."""
    import transformers

    draft_dir = tmp_path / "draft"
    config = transformers.LlamaConfig(
        vocab_size=TEST_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
    )
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(draft_dir)
    for file in hf_dir.glob("tokenizer*"):
        shutil.copy(file, draft_dir / file.name)

    base = {"kv_cache_mb": 1, "kv_dtype": "int8", "block_size": 4, "step_tokens": 8}
    plain, _, _ = build_engine(hf_dir, ServeOptions(**base), tmp_path / "plain")  # type: ignore[arg-type]
    spec_opts = ServeOptions(**base, speculate=str(draft_dir))  # type: ignore[arg-type]
    spec, _, runner = build_engine(hf_dir, spec_opts, tmp_path / "spec")
    target = PagedKVCache.bytes_per_block(2, 4, 2, 16, 4, "int8")  # the tiny Llama's
    draft = PagedKVCache.bytes_per_block(1, 4, 1, 32, 4, "int8")
    assert (target, draft) == (2 * 2 * 4 * 2 * (16 + SCALE_BYTES), 2 * 4 * (32 + SCALE_BYTES))
    assert plain.config.num_blocks == 2**20 // target
    assert spec.config.num_blocks == int(2**20 // target * target / (target + draft))
    assert spec.draft is not None
    caches = [r.cache for r in (runner, spec.draft)]  # type: ignore[attr-defined]
    assert sum(c.nbytes for c in caches) <= 2**20
    for c in caches:
        assert c.keys.dtype == torch.int8 and c.keys.shape[1] == spec.config.num_blocks
    prompts = [[t % TEST_VOCAB for t in p] for p in random_prompts(4, 40, seed=7)]
    outs = []
    for engine in (plain, spec):
        seqs = [greedy(p, 12) for p in prompts]
        engine.submit(seqs)
        run_all(engine)
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_the_openai_client_gets_answers_of_the_int8_cache(
    hf_dir: Path, reference: tuple, peft_adapter: tuple
) -> None:
    """A server with an int8 KV cache under chunked prefill (8-token steps, 4-token blocks),
    the prefix cache, a draft model (the base itself) and an adapter: greedy answers mostly
    those of `transformers` (fp32), the adapter's of `peft`."""
    srv = Server(
        hf_dir,
        *("--api-key", KEY, "--max-batch", "8", "--step-tokens", "8", "--block-size", "4"),
        *("--kv-dtype", "int8", "--adapter", f"tuned={peft_adapter[0]}"),
        *("--speculate", str(hf_dir)),
    )
    tok = reference[1]
    try:
        client = srv.client()
        same = total = 0
        for prompt in PROMPTS:
            ids = tok.encode(prompt, add_special_tokens=False)
            want = [tok.decode([i]) for i in hf_greedy(reference, ids, 12)]
            for _ in range(2):  # the second time from the prefix cache
                got = client.completions.create(
                    model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0, logprobs=0
                )
                tokens = got.choices[0].logprobs.tokens
                same += sum(a == b for a, b in zip(tokens, want, strict=False))
                total += len(want)
        assert same / total >= 0.9
        assert srv.metric("loom_prefix_cache_hit_tokens_total") > 0
        assert srv.metric("loom_spec_accepted_tokens_total") > 0
        ids = tok.encode(PROMPTS[0], add_special_tokens=False)
        tuned = client.completions.create(
            model="tuned", prompt=PROMPTS[0], max_tokens=8, temperature=0
        )
        with torch.no_grad():
            out = peft_adapter[1].generate(
                torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0
            )
        assert tuned.choices[0].text == tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    finally:
        log = srv.stop()
    assert "tokens, int8" in log


@pytest.mark.slow
def test_two_tensor_parallel_workers_share_an_int8_cache(hf_dir: Path) -> None:
    """Each rank holds int8 codes for its share of the heads (scales are per head, so the
    split changes nothing): answers and logprobs of one process."""
    args = ("--api-key", KEY, "--step-tokens", "8", "--kv-dtype", "int8")
    one, two = Server(hf_dir, *args), Server(hf_dir, "--tp", "2", *args)
    try:
        assert_same_greedy_answers(one, two, PROMPTS[:3], 12)
    finally:
        one.stop()
        log = two.stop()
    assert "2 tensor-parallel workers" in log and "tokens, int8" in log
