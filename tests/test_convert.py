"""`loom convert` against the real `transformers`: tiny random models of each Llama-family
architecture, saved by transformers itself, go HF → Loom → HF and give the same logits on real
text; the tokenizer comes back loadable by `AutoTokenizer`; bad folders get clear errors."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
import transformers
from conftest import TEST_VOCAB

from loom.cli import main as loom
from loom.core.errors import LoomError
from loom.eval.generate import load_for_generation
from loom.models.convert import convert
from loom.models.hf import load_hf_model

SMALL = {
    "vocab_size": TEST_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
FAMILIES = {
    "llama": (transformers.LlamaConfig, {"rope_theta": 500000.0}),
    "llama3-scaled": (
        transformers.LlamaConfig,
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, {}),
    "smollm-tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2-moe": (  # a dense first layer, then experts with a gated shared expert
        transformers.Qwen2MoeConfig,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [0],
        },
    ),
}


def hf_model(name: str, folder: Path, tokenizer_dir: Path) -> transformers.PreTrainedModel:
    """A random HF model of family `name`, saved in shards by transformers, with a tokenizer."""
    config_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config_class(**SMALL, **extra), attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # random norms and biases, so that they are really compared
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    model.save_pretrained(folder, max_shard_size="50KB")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return model


def real_text_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> torch.Tensor:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:2000]
    return torch.tensor([tokenizer.encode(text)[:100]])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hf_to_loom_to_hf_keeps_the_logits(name: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    original = hf_model(name, tmp_path / "hf", tokenizer_dir)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1  # sharded
    assert (
        loom(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "loom"), "--format", "loom"])
        == 0
    )
    assert (
        loom(["convert", str(tmp_path / "loom"), "--out", str(tmp_path / "back"), "--format", "hf"])
        == 0
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    ids = real_text_ids(tokenizer)
    assert ids.shape[1] == 100
    # The same tokenizer as transformers loads from the source folder.
    source_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert type(tokenizer) is type(source_tokenizer)
    assert torch.equal(ids, real_text_ids(source_tokenizer))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    assert type(back) is type(original) or name == "mistral"  # mistral is written as llama
    loom_model, _ = load_for_generation(tmp_path / "loom", torch.device("cpu"))
    with torch.no_grad():
        reference = original(ids).logits
        torch.testing.assert_close(back(ids).logits, reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(loom_model(ids), reference, atol=1e-4, rtol=0)


def test_bf16_export_and_generation_from_a_converted_folder(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_model("llama", tmp_path / "hf", tokenizer_dir)
    convert(tmp_path / "hf", tmp_path / "loom", "loom")
    convert(tmp_path / "loom", tmp_path / "bf16", "hf", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert next(back.parameters()).dtype == torch.bfloat16
    assert loom(["generate", str(tmp_path / "loom"), "--prompt", "def ", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unsupported_architectures_name_the_fields(tokenizer_dir: Path, tmp_path: Path) -> None:
    hf_model("llama", tmp_path / "hf", tokenizer_dir)
    edit_config(tmp_path / "hf", model_type="gpt2")
    with pytest.raises(LoomError, match="model_type='gpt2' is not supported; Loom imports llama"):
        load_hf_model(tmp_path / "hf")
    edit_config(tmp_path / "hf", model_type="llama", hidden_act="gelu", mlp_bias=True)
    with pytest.raises(LoomError, match=r"hidden_act='gelu' \(Loom: silu\); mlp_bias=true"):
        load_hf_model(tmp_path / "hf")
    edit_config(tmp_path / "hf", model_type="mistral", hidden_act="silu", mlp_bias=False)
    edit_config(tmp_path / "hf", sliding_window=16)
    with pytest.raises(LoomError, match="sliding_window=16"):
        load_hf_model(tmp_path / "hf")


def test_missing_shards_and_shape_mismatches_are_refused(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    hf_model("llama", tmp_path / "hf", tokenizer_dir)
    edit_config(tmp_path / "hf", intermediate_size=80)
    with pytest.raises(LoomError, match=r"mlp\..*_proj.weight has shape .*config.json implies"):
        load_hf_model(tmp_path / "hf")
    edit_config(tmp_path / "hf", intermediate_size=96)
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoomError, match=rf"1 of \d+ weight shards .* missing: {shard.name}"):
        load_hf_model(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(LoomError, match="exists and is not empty"):
        convert(tmp_path / "hf", tmp_path / "out", "loom")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_real_smollm2_gguf_imports_with_transformers_logits_and_exports(
    smollm2_gguf: Path, tmp_path: Path
) -> None:
    gguf_file = smollm2_gguf
    convert(gguf_file, tmp_path / "loom", "loom")
    convert(tmp_path / "loom", tmp_path / "hf", "hf")
    # transformers' own GGUF loader is the reference (it dequantizes the same file).
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = real_text_ids(tokenizer)
    assert torch.equal(ids, real_text_ids(reference_tokenizer))
    loom_model, _ = load_for_generation(tmp_path / "loom", torch.device("cpu"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(loom_model(ids), expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(exported(ids).logits, expected, atol=1e-4, rtol=0)
        # The exported folder is a working chat model: its own template, greedy answer.
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        answer = exported.generate(prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, prompt.shape[1] :])


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(LoomError, match=r"model.gguf is not a readable GGUF file"):
        convert(fake, tmp_path / "out", "loom")
    assert not (tmp_path / "out").exists()
