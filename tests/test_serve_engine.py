"""The serving engine without HTTP: paged attention and continuous batching give the tokens of
plain one-sequence generation; sequences join and leave at every step; long prompts are
prefilled in chunks without stalling decodes; a full cache preempts and recomputes; aborted
sequences give their blocks back; LoRA adapters chosen per sequence match `peft`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TEST_VOCAB, save_tiny_llama
from tokenizers import Tokenizer, models

from loom.core.quantize import is_quantized
from loom.eval.generate import generate
from loom.models.hf import load_hf_model
from loom.models.llama import ModelConfig, Transformer, build_model
from loom.serve.adapters import attach_adapters
from loom.serve.engine import Engine, EngineConfig, SamplingParams, Sequence, SequenceEvent
from loom.serve.kv_cache import BlockAllocator, PagedKVCache, block_hashes
from loom.serve.runner import LocalRunner
from loom.serve.server import ServeOptions, build_engine

CFG = ModelConfig(
    vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=256
)


@pytest.fixture(scope="module")
def model() -> Transformer:
    m = build_model(CFG, "cpu")
    m.init_weights(seed=3)
    return m.eval()


def word_tokenizer(vocab: int) -> Tokenizer:
    return Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))


def make_engine(model: Transformer, num_blocks: int, block_size: int = 4, **kw: int) -> Engine:
    cfg = model.cfg
    cache = PagedKVCache(
        cfg.n_layers,
        num_blocks,
        block_size,
        cfg.n_kv_heads,
        cfg.attn_head_dim,
        torch.device("cpu"),
        torch.float32,
    )
    config = EngineConfig(block_size=block_size, num_blocks=num_blocks, **kw)
    return Engine(
        LocalRunner(model, cache), word_tokenizer(cfg.vocab_size), set(), cfg.max_seq_len, config
    )


def greedy(
    prompt: list[int], max_tokens: int, events: list | None = None, **kw: object
) -> Sequence:
    sink = events.append if events is not None else (lambda e: None)
    return Sequence(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), sink, **kw)


def random_prompts(n: int, longest: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [torch.randint(1, 300, (k,), generator=g).tolist() for k in lengths]


def run_all(engine: Engine) -> list[int]:
    tokens = []
    while engine.has_work():
        tokens.append(engine.step())
    return tokens


def test_paged_batches_with_preemption_equal_one_sequence_at_a_time(model: Transformer) -> None:
    # 40 blocks of 4 = 160 tokens for 6 sequences of up to 80: the cache must preempt.
    engine = make_engine(model, num_blocks=40, max_batch=6, step_tokens=24)
    prompts = random_prompts(14, 60)
    seqs = [greedy(p, 20) for p in prompts]
    engine.submit(seqs)
    steps = run_all(engine)
    assert engine.preemptions > 0
    assert max(steps) <= 24 + 6  # chunks fill the budget left by the decodes
    for prompt, seq in zip(prompts, seqs, strict=True):
        assert seq.output_ids == generate(model, prompt, 20, temperature=0)
    assert engine.allocator.num_free == 40  # every block came back


def test_new_sequences_join_the_running_batch_and_finished_ones_leave(model: Transformer) -> None:
    engine = make_engine(model, num_blocks=64, max_batch=4, step_tokens=64)
    events: list[SequenceEvent] = []
    first = greedy([5, 6, 7], 10, events)
    engine.submit([first])
    engine.step()  # prefill + first token
    engine.step()
    assert len(first.output_ids) == 2
    late = greedy([9] * 12, 3)
    engine.submit([late])
    assert engine.step() == 1 + 12  # the late prompt rides along with the decode
    assert len(first.output_ids) == 3 and len(late.output_ids) == 1
    engine.step()
    engine.step()
    assert late.finished and late not in engine.running and first in engine.running
    run_all(engine)
    assert first.output_ids == generate(model, [5, 6, 7], 10, temperature=0)
    assert late.output_ids == generate(model, [9] * 12, 3, temperature=0)
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 10


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(model: Transformer) -> None:
    engine = make_engine(model, num_blocks=64, max_batch=4, step_tokens=16)
    short = greedy([1, 2, 3], 30)
    engine.submit([short])
    engine.step()
    long_prompt = list(range(10, 110))  # 100 tokens
    long = greedy(long_prompt, 5)
    engine.submit([long])
    for _ in range(7):  # 100 tokens in chunks of 15 beside one decode
        before = len(short.output_ids)
        assert engine.step() <= 16
        assert len(short.output_ids) == before + 1  # never stalled
    assert long.output_ids  # its prompt is done and it sampled
    run_all(engine)
    assert long.output_ids == generate(model, long_prompt, 5, temperature=0)
    assert short.output_ids == generate(model, [1, 2, 3], 30, temperature=0)


def test_blocks_follow_actual_lengths_not_the_context(model: Transformer) -> None:
    engine = make_engine(model, num_blocks=256, max_batch=8, step_tokens=256)
    seqs = [greedy([7] * 10, 6) for _ in range(8)]
    engine.submit(seqs)
    engine.step()
    used = engine.allocator.num_blocks - engine.allocator.num_free
    assert used == 8 * 3  # 11 tokens in blocks of 4, not 256-token slabs
    run_all(engine)
    assert engine.allocator.num_free == 256


def test_an_aborted_sequence_frees_its_blocks_and_says_so(model: Transformer) -> None:
    engine = make_engine(model, num_blocks=32)
    events: list[SequenceEvent] = []
    seq = greedy(list(range(1, 20)), 100, events)
    other = greedy([3, 4], 4)
    engine.submit([seq, other])
    engine.step()
    assert engine.allocator.num_free < 32
    engine.abort([seq])
    engine.step()
    assert seq.finished and events[-1].finish_reason == "abort"
    run_all(engine)
    assert engine.allocator.num_free == 32
    assert other.output_ids == generate(model, [3, 4], 4, temperature=0)


def test_a_shared_prefix_is_computed_once_and_answers_do_not_change(model: Transformer) -> None:
    """Requests sharing a 41-token system prompt: each after the first computes only its own
    tokens (the prefix's full blocks come from the cache, kept after the first one ended),
    in chunks and under preemption as well; greedy answers equal uncached generation."""
    system = random_prompts(1, 2, seed=5)[0] + list(range(100, 140))  # 41 tokens
    prompts = [system + q for q in random_prompts(6, 12, seed=6)]
    for step_tokens, num_blocks in ((256, 256), (8, 256), (24, 20)):  # plain, chunked, preempted
        cached = make_engine(model, num_blocks, max_batch=3, step_tokens=step_tokens)
        plain = make_engine(model, num_blocks, max_batch=3, step_tokens=step_tokens)
        plain.config.prefix_cache = plain.allocator.prefix_cache = False
        first = greedy(prompts[0], 6)
        cached.submit([first])
        run_all(cached)
        assert first.output_ids == generate(model, prompts[0], 6, temperature=0)
        rest = [greedy(p, 6) for p in prompts[1:]]
        cached.submit(rest)
        ran = sum(run_all(cached))
        baseline = [greedy(p, 6) for p in prompts[1:]]
        plain.submit(baseline)
        ran_plain = sum(run_all(plain))
        for prompt, seq, other in zip(prompts[1:], rest, baseline, strict=True):
            assert seq.output_ids == other.output_ids == generate(model, prompt, 6, temperature=0)
        if num_blocks == 256:  # 10 full blocks of the system prompt per request, not recomputed
            assert ran == ran_plain - 5 * 40
        else:
            assert cached.preemptions > 0 and ran < ran_plain
        assert cached.allocator.num_free == num_blocks  # cached blocks count as free


def test_cached_blocks_are_shared_counted_and_evicted_least_recently_used() -> None:
    allocator = BlockAllocator(4)
    a, b = block_hashes(list(range(8)), 4, -1), block_hashes([9] * 8, 4, -1)
    assert block_hashes(list(range(8)), 4, 0) != a  # another adapter, other keys
    assert block_hashes(list(range(10)), 4, -1) == a  # partial blocks are not hashed
    first = allocator.allocate(2)
    for block, h in zip(first, a, strict=True):
        allocator.register(block, h)
    assert allocator.lookup(a) == first  # shared while the first holds them
    allocator.free(first)
    allocator.free(first)
    assert allocator.num_free == 4 and allocator.num_cached == 2
    second = allocator.allocate(2)  # the empty blocks go first
    for block, h in zip(second, b, strict=True):
        allocator.register(block, h)
    allocator.free(second)
    assert allocator.lookup(a[:1]) == first[:1]  # a's first block is now the most recent
    allocator.free(first[:1])
    taken = allocator.allocate(3)  # evicts, oldest first: a's second block, then b's
    assert allocator.lookup(a) == first[:1] and allocator.lookup(b) == []
    assert set(taken) == {first[1], *second}
    allocator.free(first[:1])
    with pytest.raises(Exception, match="2 KV blocks asked for, 1 free"):
        allocator.allocate(2)


def test_requests_beyond_the_context_or_the_cache_are_refused(model: Transformer) -> None:
    engine = make_engine(model, num_blocks=8)  # 32 tokens
    with pytest.raises(Exception, match="context of 256"):
        engine.submit([greedy([1] * 250, 10)])
    with pytest.raises(Exception, match="KV cache of 32 tokens"):
        engine.submit([greedy([1] * 30, 10)])


def test_lora_adapters_are_chosen_per_sequence_in_one_batch(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    import peft

    base = save_tiny_llama(tmp_path / "base", tokenizer_dir)
    references = {}
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["o_proj", "down_proj", "up_proj"])):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        tuned = peft.get_peft_model(copy.deepcopy(base), lora)
        tuned.save_pretrained(tmp_path / name)
        references[name] = tuned.eval()
    references["base"] = base

    model = load_hf_model(tmp_path / "base", "cpu", torch.float32)
    names = attach_adapters(model, {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")})
    engine = make_engine(model.eval(), num_blocks=64, max_batch=6, step_tokens=64)
    prompts = random_prompts(6, 20, seed=2)
    prompts = [[t % TEST_VOCAB for t in p] for p in prompts]
    which = ["a", "b", "base", "b", "a", "base"]
    seqs = [greedy(p, 8, adapter=names.get(w, -1)) for p, w in zip(prompts, which, strict=True)]
    engine.submit(seqs)
    run_all(engine)

    def hf_greedy(reference: transformers.PreTrainedModel, prompt: list[int]) -> list[int]:
        with torch.no_grad():
            out = reference.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    changed = 0
    for prompt, w, seq in zip(prompts, which, seqs, strict=True):
        assert seq.output_ids == hf_greedy(references[w], prompt), w
        changed += w != "base" and seq.output_ids != hf_greedy(base, prompt)
    assert changed >= 2  # the adapters really change the answers

    # The prefix cache keys blocks by adapter too: the same prompts again, each under another
    # adapter than before, find no cached block of the first round and answer as their own.
    again = ["base", "a", "b", "a", "base", "b"]
    rerun = [greedy(p, 8, adapter=names.get(w, -1)) for p, w in zip(prompts, again, strict=True)]
    engine.submit(rerun)
    assert sum(run_all(engine)) == sum(len(p) + 7 for p in prompts)  # no prompt token reused
    for prompt, w, seq in zip(prompts, again, rerun, strict=True):
        assert seq.output_ids == hf_greedy(references[w], prompt), w

    # int8 serving keeps the adapters: every projection is int8, the adapted ones too, and an
    # adapter's answer stays close to the fp32 one.
    int8_engine, _, runner = build_engine(
        tmp_path / "base",
        ServeOptions(kv_cache_mb=4, quantize="int8", adapters={"a": str(tmp_path / "a")}),
        tmp_path / "scratch",
    )
    names = [n for n, _ in runner.model.named_modules() if n.endswith(("_proj", "lm_head"))]
    assert names and all(is_quantized(runner.model.get_submodule(n).weight) for n in names)
    assert any(type(runner.model.get_submodule(n)).__name__ == "MultiLoRALinear" for n in names)
    int8_seq = greedy(prompts[0], 8, adapter=0)
    int8_engine.submit([int8_seq])
    run_all(int8_engine)
    assert hf_greedy(base, prompts[0])[0] != seqs[0].output_ids[0]  # the adapter matters here
    assert int8_seq.output_ids[:3] == seqs[0].output_ids[:3]
