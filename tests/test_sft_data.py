"""Fine-tuning data against the real SmolLM2-135M-Instruct tokenizer: chat rendering equals
transformers' apply_chat_template, the trained mask is exactly the assistant replies and their
end-of-turn markers, bad lines are counted with their line numbers, packing keeps examples whole
and apart, the split is deterministic, and preference pairs line up."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer

from loom.core.chat import CHATML_TEMPLATE, ChatTemplate
from loom.core.errors import LoomError
from loom.finetune.sft_data import (
    IGNORE,
    Rows,
    build_preferences,
    build_sft,
    read_jsonl,
    split_indices,
)

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy? Answer with 'é' and 😀 too."},
    {"role": "assistant", "content": "Rome, café 😀."},
]
NO_SYSTEM = CONVERSATION[1:]

# A Llama-3-like template in tokenizer_config.json (the named-list form): bos_token, loop
# controls, tojson and raise_exception, which transformers' sandbox provides.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role') }}{% endif %}"
    "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer: Path) -> Path:
    """The SmolLM2 tokenizer folder (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    assert (smollm2_tokenizer / "chat_template.jinja").is_file()
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def hf_smol(smol: Path) -> transformers.PreTrainedTokenizerBase:
    return transformers.AutoTokenizer.from_pretrained(smol)


@pytest.fixture(scope="module")
def tok(smol: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smol / "tokenizer.json"))


def variant(smol: Path, out: Path, chat_template: object = None) -> Path:
    """The SmolLM2 tokenizer without its template file, optionally with one in the config."""
    out.mkdir()
    shutil.copy(smol / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((smol / "tokenizer_config.json").read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trained_texts(rows: Rows, tok: Tokenizer) -> list[list[str]]:
    """Per row, the decoded runs of consecutive trained targets."""
    out = []
    for targets in rows.targets.tolist():
        runs: list[list[int]] = []
        previous = False
        for t in targets:
            if t != IGNORE:
                if not previous:
                    runs.append([])
                runs[-1].append(t)
            previous = t != IGNORE
        out.append([tok.decode(run, skip_special_tokens=False) for run in runs])
    return out


def full_text(rows: Rows, row: int, tok: Tokenizer) -> str:
    """The text of an unpacked row's example: its inputs, then its last target."""
    n = int((rows.doc_ids[row] == 0).sum())
    inputs = rows.inputs[row, :n].tolist()
    last = int(rows.targets[row, n - 1])
    return tok.decode([*inputs, last], skip_special_tokens=False)


def segments(rows: Rows, pad_id: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(inputs, targets) of every example in the rows, found by doc id; padding (a trailing
    segment without any trained target) is checked and left out."""
    out = []
    for inputs, targets, docs in zip(
        rows.inputs.tolist(), rows.targets.tolist(), rows.doc_ids.tolist(), strict=True
    ):
        starts = [0] + [j for j in range(1, len(docs)) if docs[j] != docs[j - 1]]
        ids = [docs[s] for s in starts]
        assert len(set(ids)) == len(ids), "a doc id appears in two separate stretches"
        for k, s in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else len(docs)
            seg = (tuple(inputs[s:e]), tuple(targets[s:e]))
            if all(t == IGNORE for t in seg[1]):
                assert k == len(starts) - 1, "padding in the middle of a row"
                assert docs[s] not in ids[:-1] and set(seg[0]) == {pad_id}
            else:
                out.append(seg)
    return out


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize(
    "messages",
    [CONVERSATION, NO_SYSTEM, CONVERSATION[:2], NO_SYSTEM[:3]],
    ids=["system-multi-turn", "multi-turn", "system-user", "user-assistant-user"],
)
def test_render_equals_transformers(
    smol: Path,
    hf_smol: transformers.PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    generation_prompt: bool,
) -> None:
    expected = hf_smol.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    template = ChatTemplate.from_tokenizer_dir(smol, "auto")
    assert template.render(messages, add_generation_prompt=generation_prompt) == expected


def test_config_template_list_uses_default_and_equals_transformers(
    smol: Path, tmp_path: Path
) -> None:
    folder = variant(
        smol,
        tmp_path / "tok",
        [
            {"name": "default", "template": STRICT_TEMPLATE},
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        ],
    )
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    template = ChatTemplate.from_tokenizer_dir(folder, "auto")
    for flag in (False, True):
        assert template.render(CONVERSATION, flag) == reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=flag
        )
    with pytest.raises(LoomError, match="must alternate"):
        template.render([CONVERSATION[1], CONVERSATION[1]])


def test_chatml_fallback_warns_and_renders_chatml(
    smol: Path, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    folder = variant(smol, tmp_path / "tok")
    template = ChatTemplate.from_tokenizer_dir(folder, "auto")
    warnings = [r for r in loom_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no chat template" in warnings[0].getMessage()
    assert "built-in ChatML" in warnings[0].getMessage()
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for flag in (False, True):
        assert template.render(CONVERSATION, flag) == reference.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=flag, chat_template=CHATML_TEMPLATE
        )
    loom_logs.clear()
    explicit = ChatTemplate.from_tokenizer_dir(smol, "chatml")  # chosen: no warning
    assert explicit.is_builtin_chatml and not loom_logs.records
    with pytest.raises(LoomError, match="data.template=none renders no conversations"):
        ChatTemplate.from_tokenizer_dir(smol, "none").render(CONVERSATION)
    with pytest.raises(LoomError, match="is not one of auto, chatml, none"):
        ChatTemplate.from_tokenizer_dir(smol, "llama")


# --------------------------------------------------------------------------- SFT


def test_trained_mask_is_exactly_the_assistant_replies(
    smol: Path, hf_smol: transformers.PreTrainedTokenizerBase, tok: Tokenizer, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    sft = build_sft(data, smol, 256, val_fraction=0, packing=False)
    assert len(sft.train) == 1 and len(sft.val) == 0
    assert full_text(sft.train, 0, tok) == hf_smol.apply_chat_template(CONVERSATION, tokenize=False)
    assert trained_texts(sft.train, tok) == [
        ["Paris is the capital of France.<|im_end|>\n", "Rome, café 😀.<|im_end|>\n"]
    ]
    # The same ids transformers gives the rendered text (special tokens as single tokens).
    ids = hf_smol(full_text(sft.train, 0, tok), add_special_tokens=False)["input_ids"]
    n = len(ids) - 1
    assert sft.train.inputs[0, :n].tolist() == ids[:-1]
    assert sft.report.trained_tokens == int((sft.train.targets != IGNORE).sum())
    assert sft.pad_id == tok.token_to_id("<|im_end|>")  # SmolLM2's pad token


def test_three_shapes(smol: Path, tok: Tokenizer, tmp_path: Path) -> None:
    template = ChatTemplate.from_tokenizer_dir(smol, "auto")
    data = write_jsonl(
        tmp_path / "shapes.jsonl",
        [
            {"messages": NO_SYSTEM[:2], "id": 7},  # extra keys are fine
            {"prompt": "Name a colour.", "completion": "Blue."},
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Say bye.", "output": "Bye!"},
        ],
    )
    sft = build_sft(data, smol, 256, val_fraction=0, packing=False)
    conversations = [
        NO_SYSTEM[:2],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [
            {"role": "user", "content": "Translate to French.\n\ncat"},
            {"role": "assistant", "content": "chat"},
        ],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye!"}],
    ]
    texts = [full_text(sft.train, i, tok) for i in range(len(sft.train))]
    assert texts == [template.render(c) for c in conversations]
    assert trained_texts(sft.train, tok) == [
        [c[-1]["content"] + "<|im_end|>\n"] for c in conversations
    ]
    assert sft.report.examples == sft.report.train_examples == 5 and sft.report.malformed == 0


def test_raw_mode_is_prompt_completion_eos(smol: Path, tok: Tokenizer, tmp_path: Path) -> None:
    data = write_jsonl(
        tmp_path / "raw.jsonl",
        [{"prompt": "2 + 2 =", "completion": " 4"}, {"instruction": "Q:", "output": " A"}],
    )
    sft = build_sft(data, smol, 64, template="none", val_fraction=0, packing=False)
    assert [full_text(sft.train, i, tok) for i in range(2)] == [
        "2 + 2 = 4<|im_end|>",
        "Q: A<|im_end|>",
    ]
    assert trained_texts(sft.train, tok) == [[" 4<|im_end|>"], [" A<|im_end|>"]]
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": NO_SYSTEM}])
    with pytest.raises(LoomError, match="line 1: chat records .* need a chat template"):
        build_sft(chat, smol, 64, template="none")


def test_malformed_lines_are_counted_with_line_numbers(
    smol: Path, tmp_path: Path, loom_logs: pytest.LogCaptureFixture
) -> None:
    good = json.dumps({"prompt": "Hi", "completion": "Hello"})
    lines = [
        good,  # 1
        "{not json",  # 2
        "",  # 3: blank, ignored
        "[1, 2]",  # 4
        json.dumps({"prompt": "Hi"}),  # 5: unknown shape
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),  # 6
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),  # 7
        json.dumps({"prompt": 3, "completion": "x"}),  # 8
        good,  # 9
        json.dumps({"instruction": "x", "input": 5, "output": "y"}),  # 10
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    records, bad = read_jsonl(data)
    assert [n for n, _ in records] == [1, 5, 6, 7, 8, 9, 10]
    assert [n for n, _ in bad] == [2, 4]
    sft = build_sft(data, smol, 64, val_fraction=0)
    report = sft.report
    assert (report.lines, report.examples, report.malformed) == (9, 2, 7)
    assert [m.split(":")[0] for m in report.malformed_examples] == [
        "line 2",
        "line 4",
        "line 5",
        "line 6",
        "line 7",
    ]
    assert "found keys ['prompt']" in report.malformed_examples[2]
    assert "role 'tool'" in report.malformed_examples[3]
    assert "no assistant message" in report.malformed_examples[4]
    warning = next(r.getMessage() for r in loom_logs.records if r.levelno == logging.WARNING)
    assert warning.startswith("7 malformed lines") and "line 2: not valid JSON" in warning


def test_unusable_files_fail_before_any_work(smol: Path, tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="does not exist"):
        build_sft(tmp_path / "missing.jsonl", smol, 64)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LoomError, match="empty.jsonl is empty"):
        build_sft(tmp_path / "empty.jsonl", smol, 64)
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3)
    with pytest.raises(LoomError) as error:
        build_sft(dpo, smol, 64)
    message = str(error.value)
    assert "all 3 non-blank lines are malformed" in message
    assert "line 1: unknown record shape: found keys ['chosen', 'prompt', 'rejected']" in message
    assert '{"prompt", "completion"}' in message
    with pytest.raises(LoomError, match="--overlong 'cut'"):
        build_sft(dpo, smol, 64, overlong="cut")
    with pytest.raises(LoomError, match="no tokenizer"):
        build_sft(dpo, tmp_path, 64)


def test_truncate_and_drop_are_counted(smol: Path, tok: Tokenizer, tmp_path: Path) -> None:
    long_reply = " ".join(["word"] * 80)
    data = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "Short?", "completion": "Yes."},
            {"prompt": "Long?", "completion": long_reply},
            {"prompt": " ".join(["question"] * 80), "completion": "No."},  # reply past the end
        ],
    )
    seq_len = 48
    cut = build_sft(data, smol, seq_len, overlong="truncate", val_fraction=0, packing=False)
    assert (cut.report.truncated, cut.report.dropped_overlong, cut.report.dropped_untrained) == (
        2,
        0,
        1,
    )
    assert len(cut.train) == 2 and cut.train.inputs.shape == (2, seq_len)
    texts = trained_texts(cut.train, tok)
    assert texts[0] == ["Yes.<|im_end|>\n"]
    assert texts[1][0].startswith("word word") and "<|im_end|>" not in texts[1][0]
    assert (cut.train.doc_ids[1] == 0).all()  # exactly seq_len + 1 tokens kept
    drop = build_sft(data, smol, seq_len, overlong="drop", val_fraction=0, packing=False)
    assert (drop.report.truncated, drop.report.dropped_overlong, drop.report.dropped_untrained) == (
        0,
        2,
        0,
    )
    assert trained_texts(drop.train, tok) == [["Yes.<|im_end|>\n"]]


def many_records(n: int) -> list[dict[str, str]]:
    """Distinct prompt/completion records of varied lengths."""
    return [
        {
            "prompt": f"Question {i}: " + "tell me more " * (i % 7),
            "completion": f"Answer {i}." + " more" * (3 * (i % 11)),
        }
        for i in range(n)
    ]


def test_packing_keeps_examples_whole_and_apart(smol: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "many.jsonl", many_records(60))
    seq_len = 128
    packed = build_sft(data, smol, seq_len, val_fraction=0)
    single = build_sft(data, smol, seq_len, val_fraction=0, packing=False)
    assert len(single.train) == 60 and len(packed.train) < 60
    assert packed.report.packing_efficiency > single.report.packing_efficiency
    assert packed.report.tokens == single.report.tokens
    # Every example appears exactly once, whole, under its own doc id, with the same targets.
    pad = packed.pad_id
    assert Counter(segments(packed.train, pad)) == Counter(segments(single.train, pad))
    assert len(segments(packed.train, pad)) == 60
    for rows in (packed.train, single.train):
        assert rows.inputs.dtype == rows.targets.dtype == torch.int64
        assert rows.inputs.shape == rows.targets.shape == rows.doc_ids.shape
    assert int((packed.train.targets != IGNORE).sum()) == packed.report.trained_tokens
    # Deterministic.
    again = build_sft(data, smol, seq_len, val_fraction=0)
    assert torch.equal(again.train.inputs, packed.train.inputs)
    assert torch.equal(again.train.doc_ids, packed.train.doc_ids)


def test_split_is_deterministic_and_disjoint(smol: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "many.jsonl", many_records(40))
    first = build_sft(data, smol, 128, val_fraction=0.2, seed=3)
    second = build_sft(data, smol, 128, val_fraction=0.2, seed=3)
    other = build_sft(data, smol, 128, val_fraction=0.2, seed=4)
    assert (first.report.train_examples, first.report.val_examples) == (32, 8)
    pad = first.pad_id
    train, val = set(segments(first.train, pad)), set(segments(first.val, pad))
    assert len(train) == 32 and len(val) == 8 and not train & val
    assert val == set(segments(second.val, pad)) and val != set(segments(other.val, pad))
    assert split_indices(2, 0.01, 0) in (([0], [1]), ([1], [0]))
    assert split_indices(5, 0, 0) == ([0, 1, 2, 3, 4], [])
    held_out = write_jsonl(tmp_path / "val.jsonl", many_records(3))
    given = build_sft(data, smol, 128, val_path=held_out)
    assert (given.report.train_examples, given.report.val_examples) == (40, 3)


def test_template_that_rejects_a_conversation_counts_it(smol: Path, tmp_path: Path) -> None:
    folder = variant(smol, tmp_path / "tok", STRICT_TEMPLATE)
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": NO_SYSTEM}, {"messages": [NO_SYSTEM[0], *NO_SYSTEM[:2]]}],
    )
    sft = build_sft(data, folder, 256, val_fraction=0)
    assert sft.report.malformed == 1 and "line 2" in sft.report.malformed_examples[0]
    assert "roles must alternate" in sft.report.malformed_examples[0]
    only_bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [NO_SYSTEM[0], *NO_SYSTEM[:2]]}])
    with pytest.raises(LoomError, match="rejected every record of .*bad.jsonl"):
        build_sft(only_bad, folder, 256)


def test_template_breaking_the_prefix_rule_is_an_error(smol: Path, tmp_path: Path) -> None:
    counting = (
        "turns={{ messages | length }}\n{% for m in messages %}{{ m['role'] }}: "
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    folder = variant(smol, tmp_path / "tok", counting)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": NO_SYSTEM[:2]}])
    with pytest.raises(LoomError, match="line 1: the chat template .* prefix"):
        build_sft(data, folder, 256)


# --------------------------------------------------------------------------- preferences


def test_preference_pairs_align(smol: Path, tok: Tokenizer, tmp_path: Path) -> None:
    records = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
        {
            "prompt": [SYSTEM, *NO_SYSTEM[:3]],
            "chosen": {"role": "assistant", "content": "Rome."},
            "rejected": [{"role": "assistant", "content": "Milan is the capital."}],
        },
        {"prompt": "No answers", "chosen": "x"},  # line 3: malformed
        {"prompt": "Two", "chosen": ["a", "b"], "rejected": "c"},  # line 4: malformed
        {"prompt": "Long?", "chosen": "Yes.", "rejected": " ".join(["no"] * 100)},
    ]
    data = write_jsonl(tmp_path / "dpo.jsonl", records)
    pairs = build_preferences(data, smol, 96, overlong="truncate", val_fraction=0)
    report = pairs.report
    assert (report.examples, report.malformed, report.truncated) == (3, 2, 1)
    assert [m.split(":")[0] for m in report.malformed_examples] == ["line 3", "line 4"]
    chosen, rejected = pairs.train.chosen, pairs.train.rejected
    assert len(chosen) == len(rejected) == len(pairs.train) == 3
    assert chosen.inputs.shape == rejected.inputs.shape == (3, 96)
    assert [t[0] for t in trained_texts(chosen, tok)] == [
        "Paris.<|im_end|>\n",
        "Rome.<|im_end|>\n",
        "Yes.<|im_end|>\n",
    ]
    assert trained_texts(rejected, tok)[:2] == [
        ["Lyon, I think.<|im_end|>\n"],
        ["Milan is the capital.<|im_end|>\n"],
    ]
    # Only the final answer is trained (not the earlier assistant turn of the prompt), and both
    # sides of a pair share the prompt up to the first trained target.
    for i in range(3):
        first_c = int((chosen.targets[i] != IGNORE).nonzero()[0])
        first_r = int((rejected.targets[i] != IGNORE).nonzero()[0])
        assert first_c == first_r
        assert torch.equal(chosen.inputs[i, : first_c + 1], rejected.inputs[i, : first_r + 1])
    dropped = build_preferences(data, smol, 96, overlong="drop", val_fraction=0)
    assert (dropped.report.dropped_overlong, len(dropped.train)) == (1, 2)
