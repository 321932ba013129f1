"""Mixture of experts: the sorted, batched dispatch equals a per-token loop (dropless and with a
capacity); the auxiliary loss adds its gradient without changing the output; the bias balancing
moves load; `[moe]` turns any model into an MoE with clear errors; training logs the routing
and resumes with the balance bias; Mixtral and Qwen2-MoE import and export with transformers'
logits, and Loom's generation and serving engine give transformers' greedy tokens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import TEST_VOCAB, tiny_args
from run_layouts import launch, roll_back
from safetensors.torch import save_file
from tokenizers import Tokenizer, models

from loom.core.config import config_from_dict, load_config
from loom.core.errors import LoomError
from loom.core.model_config import ModelConfig, MoEConfig
from loom.eval.generate import generate, load_for_generation
from loom.models.hf import hf_config_dict, load_hf_model, to_hf_state_dict
from loom.models.llama import build_model
from loom.models.moe import MoE, RoutingStats
from loom.parallel.dims import resolve
from loom.planner.memory import estimate
from loom.planner.spec import Strategy, gpu_hardware, model_from_config
from loom.report import write_report
from loom.serve.engine import Engine, EngineConfig, SamplingParams, Sequence
from loom.serve.kv_cache import PagedKVCache
from loom.serve.runner import LocalRunner
from loom.train.trainer import Trainer, train


def moe_layer(seed: int = 0, **moe: object) -> MoE:
    cfg = ModelConfig(dim=16, ffn_hidden=24, moe=MoEConfig(**{"experts": 4, **moe}))  # type: ignore[arg-type]
    model = build_model(cfg, "cpu")
    model.init_weights(seed)
    layer = model.layers["0"].mlp
    assert isinstance(layer, MoE)
    return layer


def per_token(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The MoE written as a loop over tokens and their experts; an expert over its capacity
    (in the order of the token-major assignments) passes the token on with nothing added."""
    m, w = layer.cfg, layer.experts
    hidden = w.down_proj.shape[2]
    tokens = x.shape[0]
    capacity = math.ceil(m.capacity_factor * tokens * m.top_k / m.experts) or tokens * m.top_k
    taken = [0] * m.experts
    out, dropped = torch.zeros_like(x), 0
    for t in range(tokens):
        scores = F.softmax(layer.gate(x[t]).float(), dim=-1)
        chosen = torch.topk(scores + layer.balance_bias, m.top_k).indices.tolist()
        total = sum(float(scores[e]) for e in chosen) if m.norm_top_k else 1.0
        for e in chosen:
            if taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            gate, up = w.gate_up_proj[e, :hidden] @ x[t], w.gate_up_proj[e, hidden:] @ x[t]
            out[t] += float(scores[e]) / total * (w.down_proj[e] @ (F.silu(gate) * up))
        if layer.shared_expert is not None:
            shared = layer.shared_expert(x[t])
            if layer.shared_expert_gate is not None:
                shared = torch.sigmoid(layer.shared_expert_gate(x[t])) * shared
            out[t] += shared
    return out, dropped


@pytest.mark.parametrize(
    "moe",
    [
        {"top_k": 2},
        {"top_k": 1, "shared_experts": 1, "shared_expert_gate": True, "norm_top_k": False},
        {"top_k": 2, "capacity_factor": 0.5},
        {"top_k": 3, "capacity_factor": 1.0, "shared_experts": 2},
    ],
)
def test_sorted_dispatch_equals_a_per_token_loop(moe: dict) -> None:
    layer = moe_layer(**moe).train()
    with torch.no_grad():
        layer.balance_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))  # selection only
    x = torch.randn(2, 25, 16)
    with torch.no_grad():
        ours = layer(x)
        expected, dropped = per_token(layer, x.reshape(-1, 16))
    torch.testing.assert_close(ours.reshape(-1, 16), expected, atol=1e-6, rtol=1e-6)
    assert int(layer.dropped) == dropped
    assert (dropped > 0) == bool(moe.get("capacity_factor"))
    assert int(layer.tokens_per_expert.sum()) == 50 * moe["top_k"]
    if dropped:  # evaluation is dropless: every assignment counts
        with torch.no_grad():
            layer.eval()
            layer.cfg.capacity_factor = 0.0
            dropless, _ = per_token(layer, x.reshape(-1, 16))
            torch.testing.assert_close(layer(x).reshape(-1, 16), dropless, atol=1e-6, rtol=1e-6)


def test_aux_loss_adds_its_gradient_and_leaves_the_output() -> None:
    weight = 0.5
    with_aux = moe_layer(seed=1, aux_loss_weight=weight).train()
    without = moe_layer(seed=1, aux_loss_weight=0.0).train()
    x, probe = torch.randn(30, 16), torch.randn(30, 16)
    out = with_aux(x)
    (out * probe).sum().backward()
    reference = without(x)
    scores = F.softmax(without.gate(x), dim=-1)
    load = torch.bincount(torch.topk(scores, 2).indices.flatten(), minlength=4) / 60
    aux = 4 * (load * scores.mean(dim=0)).sum()  # Switch Transformer's balance loss
    ((reference * probe).sum() + weight * aux).backward()
    torch.testing.assert_close(out, reference)
    assert float(with_aux.balance_loss) == pytest.approx(float(aux.detach()), rel=1e-6)
    torch.testing.assert_close(with_aux.gate.weight.grad, without.gate.weight.grad)
    assert not torch.allclose(  # the aux term really changes the router's gradient
        with_aux.gate.weight.grad,
        without.gate.weight.grad
        - weight
        * torch.autograd.grad(
            4 * (load * F.softmax(without.gate(x), dim=-1).mean(dim=0)).sum(),
            without.gate.weight,
        )[0],
    )


def test_bias_balancing_evens_out_a_skewed_router() -> None:
    rate = 0.01
    layer = moe_layer(balance="bias", bias_update_rate=rate, aux_loss_weight=0.0).train()
    with torch.no_grad():
        layer.gate.weight[0] += 0.1  # expert 0 wins for every token
    stats = RoutingStats([layer])
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0)).abs()
    max_loads = []
    for _ in range(100):
        stats.reset()
        with torch.no_grad():
            layer(x)  # counted by the stats' forward hook
        max_loads.append(stats.metrics()["moe_max_load"])
        before = stats.load[0].clone()
        stats.update_balance_bias()
        if len(max_loads) == 1:  # over the mean load: down by the rate; under it: up
            torch.testing.assert_close(
                layer.balance_bias, rate * torch.sign(before.mean() - before)
            )
    assert max_loads[0] == 2.0  # expert 0 in every token's top 2; 1.0 = even
    assert sum(max_loads[-20:]) / 20 < 1.8
    assert float(layer.balance_bias[0]) < 0 < float(layer.balance_bias[1:].min())


def test_moe_section_turns_a_model_into_experts_and_refuses_bad_values(tmp_path: Path) -> None:
    cfg = load_config(None, ["--model.preset=llama3.2-1b", "--moe.experts=8", "--moe.top_k=2"])
    assert cfg.model.moe.experts == 8 and cfg.model.expert_hidden == cfg.model.ffn_hidden
    dense = load_config(None, ["--model.preset=llama3.2-1b"]).model
    assert cfg.model.num_params() - dense.num_params() == 16 * (
        7 * 3 * dense.dim * dense.ffn_hidden + 8 * dense.dim
    )  # 7 more experts and a router in each of the 16 layers
    assert cfg.model.num_params(active=True) - dense.num_params() == 16 * (
        3 * dense.dim * dense.ffn_hidden + 8 * dense.dim
    )
    assert load_config(None, ["--model.preset=tiny-moe", "--moe.experts=0"]).model.moe_layers == 0
    for overrides, message in [
        (["--moe.experts=4", "--moe.top_k=5"], "moe.top_k=5 must be between 1 and"),
        (["--moe.experts=4", "--moe.balance=loss"], "balance"),
        (["--moe.experts=4", "--moe.shared_expert_gate=true"], "set moe.shared_experts"),
        (["--moe.experts=4", "--moe.first_dense_layers=9"], "leaves no MoE layer"),
    ]:
        with pytest.raises(LoomError, match=message):
            load_config(None, ["--model.preset=tiny", *overrides])
    for world, overrides, message in [
        (2, ["--parallel.ep=2"], "the model has none"),
        (2, ["--moe.experts=3", "--moe.top_k=1", "--parallel.ep=2"], "must divide moe.experts=3"),
        (4, ["--moe.experts=4", "--parallel.ep=2"], "must equal parallel.dp_shard=4"),
        (
            4,
            ["--moe.experts=4", "--parallel.ep=2", "--parallel.cp=2"],
            r"dp_shard × parallel.cp = 2 × 2.*set parallel.ep=4",
        ),
        (
            4,
            ["--moe.experts=4", "--parallel.ep=2", "--parallel.dp_replicate=2"],
            "dp_replicate=1",
        ),
    ]:
        with pytest.raises(LoomError, match=message):
            resolve(load_config(None, ["--model.preset=tiny", *overrides]), world)
    assert resolve(load_config(None, ["--moe.experts=4", "--parallel.ep=2"]), 2).ep == 2
    with pytest.raises(LoomError, match=r"in \[moe\] or in \[model.moe\], not both"):
        config_from_dict({"model": {"moe": {"experts": 2}}, "moe": {"experts": 4}})


def test_training_logs_the_routing_and_resumes_with_the_balance_bias(
    tiny_config, tmp_path: Path
) -> None:
    moe = ["--moe.experts=4", "--moe.top_k=2", "--moe.balance=bias", "--moe.bias_update_rate=0.05"]
    moe += ["--moe.capacity_factor=1.0", "--train.micro_batch_size=2", "--optimizer.decay_steps=8"]
    straight = train(tiny_config(*moe, "--train.steps=8", run_dir=tmp_path / "straight"))
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").open()]
    for line in lines:
        assert len(line["moe_expert_load"]) == 4
        assert sum(line["moe_expert_load"]) == pytest.approx(1.0, abs=1e-3)
        assert line["moe_max_load"] >= 1.0 and line["moe_balance_loss"] > 0
    dropped = sum(line["moe_dropped_tokens"] for line in lines)
    assert dropped > 0  # capacity 1.0 drops some
    html = write_report(tmp_path / "straight").read_text()
    assert "mixture-of-experts routing" in html
    busiest = f"busiest expert at {lines[-1]['moe_max_load']:.2f}× the mean at step 8"
    assert f"{busiest}; {dropped:,.0f} token assignments dropped" in html
    assert straight.train_losses[8] < straight.train_losses[1]

    split = tmp_path / "split"
    train(tiny_config(*moe, "--train.steps=4", run_dir=split))
    trainer = Trainer(tiny_config(*moe, "--train.steps=8", run_dir=split))
    biases = [layer.balance_bias for layer in trainer.routing.layers]  # type: ignore[union-attr]
    assert any(float(b.abs().sum()) for b in biases)  # restored from step 4's checkpoint
    resumed = trainer.run()
    for step in (5, 8):
        assert resumed.train_losses[step] == pytest.approx(straight.train_losses[step], rel=1e-5)


HF_MOE = {
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4}),
    "qwen2-moe": (
        transformers.Qwen2MoeConfig,
        {
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "mlp_only_layers": [0],
            "norm_topk_prob": True,
        },
    ),
}


def hf_moe_model(name: str) -> transformers.PreTrainedModel:
    config_class, extra = HF_MOE[name]
    config = config_class(
        vocab_size=TEST_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        **extra,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", list(HF_MOE))
def test_hf_moe_imports_and_exports_with_transformers_logits(name: str, tmp_path: Path) -> None:
    hf = hf_moe_model(name)
    hf.save_pretrained(tmp_path / "hf")  # per-expert tensors, as released checkpoints store them
    loom_model = load_hf_model(tmp_path / "hf").eval()
    assert loom_model.cfg.moe.experts == 4
    tokens = torch.randint(0, TEST_VOCAB, (2, 40))
    with torch.no_grad():
        reference = hf(tokens).logits
        torch.testing.assert_close(loom_model(tokens), reference, atol=1e-5, rtol=0)

    with torch.no_grad():  # change every weight, so the export is compared, not the import
        for p in loom_model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf_config_dict(loom_model.cfg)))
    state = to_hf_state_dict(loom_model.state_dict(), loom_model.cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "out" / "model.safetensors")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, loom_model(tokens), atol=1e-5, rtol=0)

    with torch.no_grad():  # a moved balance bias routes differently: no HF model computes it
        loom_model.layers["1"].mlp.balance_bias[0] = 0.1
    with pytest.raises(LoomError, match="balance_bias is not zero"):
        to_hf_state_dict(loom_model.state_dict(), loom_model.cfg)


def test_generation_and_serving_give_transformers_greedy_tokens(tmp_path: Path) -> None:
    hf = hf_moe_model("qwen2-moe")
    hf.save_pretrained(tmp_path / "hf")
    model = load_hf_model(tmp_path / "hf").eval()
    prompts = [[5, 17, 200, 3], [9] * 7, list(range(30, 42))]
    expected = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        expected.append(out[0, len(prompt) :].tolist())
        assert generate(model, prompt, 10, temperature=0.0) == expected[-1]

    cfg = model.cfg
    cache = PagedKVCache(
        cfg.n_layers, 32, 4, cfg.n_kv_heads, cfg.attn_head_dim, torch.device("cpu"), torch.float32
    )
    words = Tokenizer(models.WordLevel({str(i): i for i in range(TEST_VOCAB)}, unk_token="0"))
    engine = Engine(
        LocalRunner(model, cache),
        words,
        set(),
        cfg.max_seq_len,
        EngineConfig(block_size=4, num_blocks=32),
    )
    sequences = [
        Sequence(p, SamplingParams(max_tokens=10, temperature=0), lambda e: None) for p in prompts
    ]
    engine.submit(sequences)  # decoded together: routing is per token, not per batch
    while engine.has_work():
        engine.step()
    assert [s.output_ids for s in sequences] == expected


@pytest.mark.slow
def test_data_and_expert_parallel_layouts_train_an_moe_like_one_process(
    tiny_config, data_dir: Path, tmp_path: Path
) -> None:
    """Routing is per token, the bias balancing sums the counts over ranks first, and expert
    parallelism only moves tokens to where their experts live: FSDP, DDP, ep 2 and 4, and tp 2
    (with ep 2 and sequence parallelism too; each tp rank runs the MoE on the block's tokens)
    train the model one process trains, and a checkpoint reshards ep 2 → ep 4 → one process."""
    moe = ["--moe.experts=4", "--moe.top_k=2", "--moe.balance=bias", "--moe.bias_update_rate=0.05"]
    moe += ["--train.batch_size=8", "--train.micro_batch_size=4", "--metrics.tensorboard=false"]
    moe += ["--checkpoint.interval=2", "--model.tie_embeddings=false"]  # (pipeline stages)
    single = train(tiny_config(*moe, run_dir=tmp_path / "single"))
    whole_steps = ["--train.micro_batch_size=8", "--parallel.microbatches=2"]
    layouts = {
        "fsdp2": ["--parallel.dp_shard=2"],
        "ddp2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
        "ep2": ["--parallel.dp_shard=2", "--parallel.ep=2"],
        # (pipeline micro-batches of 4 sequences, as the one process runs: routing is
        # discontinuous, so a near tie may go another way with matmuls of another shape)
        "pp2": ["--parallel.pp=2", "--parallel.dp_shard=1", *whole_steps],
    }
    spec = [
        {"name": name, "args": tiny_args(data_dir, tmp_path / name, *moe, *layout)}
        for name, layout in layouts.items()
    ]
    records = launch(2, spec, tmp_path)
    ep4 = tiny_args(data_dir, tmp_path / "ep4", *moe, "--parallel.ep=4")
    resumed = tiny_args(data_dir, tmp_path / "ep2_to_ep4", *moe, "--parallel.ep=4")
    tp = ["--parallel.dp_shard=2", "--parallel.tp=2"]
    tensor = {
        "tp2": [*tp, "--parallel.sequence_parallel=false"],
        "ep2_tp2_sp": [*tp, "--parallel.ep=2", "--parallel.sequence_parallel=true"],
        "ep4_cp2": ["--parallel.dp_shard=2", "--parallel.cp=2", "--parallel.ep=4"],
    }
    records |= launch(
        4,
        [
            *(
                {"name": n, "args": tiny_args(data_dir, tmp_path / n, *moe, *a)}
                for n, a in tensor.items()
            ),
            {"name": "ep4", "args": ep4},
            {
                "name": "ep2_to_ep4",
                "args": resumed,
                "resume_from": {"run_dir": str(tmp_path / "ep2"), "step": 4},
            },
        ],
        tmp_path,
    )
    # 8 ranks: experts over the FSDP ranks (ep = dp_shard × cp) with tp, cp and pp
    pp = ["--parallel.pp=2", "--parallel.tp=2", *whole_steps]
    eight = {
        "ep4_cp2_tp2": [*tp, "--parallel.cp=2", "--parallel.ep=4"],
        "ep2_tp2_pp2": [*pp, "--parallel.dp_shard=2", "--parallel.ep=2"],
        "ep2_cp2_tp2_pp2": [*pp, "--parallel.dp_shard=1", "--parallel.cp=2", "--parallel.ep=2"],
    }
    spec = [
        {"name": n, "args": tiny_args(data_dir, tmp_path / n, *moe, *a)} for n, a in eight.items()
    ]
    records |= launch(8, spec, tmp_path)
    tensor |= eight
    roll_back(tmp_path / "ep2_to_ep4", tmp_path / "ep4_to_one", 6)
    one = train(tiny_config(*moe, run_dir=tmp_path / "ep4_to_one"))
    assert {k: v for k, v in single.train_losses.items() if k > 6} == pytest.approx(
        one.train_losses, abs=1e-5
    )
    reference = load_for_generation(tmp_path / "single", torch.device("cpu"))[0].state_dict()
    for name in [*layouts, *tensor, "ep4", "ep2_to_ep4", "ep4_to_one"]:
        if name in records:
            losses = {int(k): v for k, v in records[name][0]["losses"].items()}
            expected = {k: v for k, v in single.train_losses.items() if k in losses}
            assert losses == pytest.approx(expected, abs=1e-5), name
        state = load_for_generation(tmp_path / name, torch.device("cpu"))[0].state_dict()
        assert any(float(v.abs().sum()) for k, v in state.items() if k.endswith("balance_bias"))
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-4, rtol=0, msg=name)
    # the planner's weights, gradients and Adam state per rank (fp32: 4 + 4 + 8 bytes for every
    # parameter, the experts' all included) against what each rank holds; FSDP pads a tensor
    # that does not split evenly by at most one row per rank
    model = model_from_config(load_config(None, tiny_args(data_dir, tmp_path, *moe)).model, 32)
    for name, ranks, tp in [
        ("fsdp2", 2, 1),
        ("ep2", 2, 1),
        ("ep4", 4, 1),
        ("ddp2", 2, 1),
        ("tp2", 4, 2),
        ("ep2_tp2_sp", 4, 2),
        ("ep4_cp2", 4, 1),
        ("ep4_cp2_tp2", 8, 2),
    ]:
        cp = 2 if "cp2" in name else 1
        strategy = Strategy(
            precision="fp32",
            framework="loom",
            tp=tp,
            cp=cp,
            dp=ranks // tp // cp,
            ep=2 if name.startswith("ep2") else 4 if name.startswith("ep4") else 1,
            zero_stage=0 if name == "ddp2" else 3,
        )
        memory = estimate(model, gpu_hardware("h100", ranks), strategy)
        for kind, value in [("params", memory.params), ("optimizer", memory.optimizer)]:
            held = [r["bytes"][kind] for r in records[name].values()]
            assert max(held) == pytest.approx(value, rel=0.01), (name, kind)
    assert records["ep4"][0]["layout"] == "dp_shard 4 (experts over ep 4)"
    # FSDP gathers every expert to run it; expert parallelism keeps experts/ep and moves tokens
    for name, module, held in [("fsdp2", "Experts", 2), ("ep2", "ExpertParallel", 2)]:
        assert all(r["experts"] == [[module, held]] * 2 for r in records[name].values()), name
    assert all(r["experts"] == [["ExpertParallel", 1]] * 2 for r in records["ep4"].values())


def test_the_planner_costs_active_parameters_and_holds_all_of_them() -> None:
    """Mixtral in the planner: a token's FLOPs and time are those of a dense model as wide as
    its two experts; its memory holds all eight."""
    from dataclasses import replace

    from loom.core.presets import get_preset
    from loom.planner.cost import step_time

    cfg = get_preset("mixtral-8x7b")
    moe = model_from_config(cfg, 4096)
    dense = replace(moe, experts=0, top_k=0, expert_ffn=0, moe_layers=0, ffn_hidden=2 * 14336)
    assert moe.params() == cfg.num_params()
    assert dense.params() == pytest.approx(cfg.num_params(active=True), rel=1e-4)  # + router
    hw = gpu_hardware("h100", 64)
    strategy = Strategy(dp=64, zero_stage=3, micro_batch=1, global_batch=64, recompute="full")
    ours, wide = step_time(moe, hw, strategy), step_time(dense, hw, strategy)
    assert ours.model_flops == pytest.approx(wide.model_flops, rel=1e-3)
    assert ours.compute == pytest.approx(wide.compute, rel=1e-3)
    held = estimate(moe, hw, strategy).params / estimate(dense, hw, strategy).params
    assert held == pytest.approx(cfg.num_params() / cfg.num_params(active=True), rel=1e-3)


def test_the_planner_offers_expert_parallelism_as_loom_runs_it() -> None:
    """An ep layout (ep = dp × cp under FSDP) beside each FSDP one: the all-to-alls cost time, the
    experts leave FSDP's traffic, and its command runs `--parallel.ep`; ep that Loom does not
    run is refused."""
    from dataclasses import replace

    from loom.core.presets import get_preset
    from loom.planner.layout import config_overrides
    from loom.planner.search import candidates, evaluate
    from loom.planner.spec import check_strategy

    model = model_from_config(get_preset("qwen1.5-moe-a2.7b"), 4096)
    hw = gpu_hardware("h100", 4)
    found = candidates(model, hw, Strategy(global_batch=64), 64)
    split = [s for s in found if s.ep > 1]
    assert split and all(s.ep == s.dp * s.cp and s.zero_stage == 3 for s in split)
    assert {(s.tp, s.ep) for s in split} >= {(1, 4), (2, 2)}  # each tp rank runs the MoE whole
    split = [s for s in split if s.ep == 4 and s.cp == 1]
    ep, fsdp = evaluate(model, hw, split[0]).time, evaluate(model, hw, replace(split[0], ep=1)).time
    assert ep.expert_parallel > 0 == fsdp.expert_parallel
    assert ep.data_parallel <= fsdp.data_parallel
    assert config_overrides(model, split[0])["parallel.ep"] == "4"
    dense = model_from_config(get_preset("llama3-8b"), 4096)
    for shape, strategy, message in [
        (dense, split[0], "the model needs experts"),
        (model, replace(split[0], ep=2), "ep = dp × cp = 4"),
        (model, replace(split[0], ep=3), "must divide them"),
    ]:
        with pytest.raises(LoomError, match=message):
            check_strategy(shape, hw, strategy)


def test_the_planner_splits_expert_states_over_ep_and_reads_latent_attention() -> None:
    """DeepSeek-V3 in the planner: its parameters and FLOPs are the model's (latent attention's
    low-rank projections and narrow value heads included); under Megatron-style ZeRO-1 with ep
    64, each rank holds 1/64 of the experts' weights and gradients and 1/dp of their optimizer
    state, the rest whole (weights, gradients) or 1/dp (optimizer)."""
    from dataclasses import replace

    from loom.core.presets import get_preset
    from loom.planner.cost import model_flops_per_token
    from loom.planner.memory import rank_layers

    cfg = get_preset("deepseek-v3")
    model = model_from_config(cfg, 4096)
    assert model.params() == cfg.num_params()
    no_mla = replace(model, attention_weights=0, value_head_dim=0)
    assert no_mla.params() > model.params()  # 128 full-width q/k/v/o heads would be larger
    s = Strategy(pp=16, dp=128, ep=64, zero_stage=1, precision="fp8", framework="megatron")
    assert model_flops_per_token(model, s) == pytest.approx(cfg.flops_per_token(4096), rel=1e-5)
    hw = gpu_hardware("h800", 2048)
    layers = max(rank_layers(model.layers, 16, 1))
    experts = layers * model.expert_params_per_layer()
    split, whole = estimate(model, hw, s), estimate(model, hw, replace(s, ep=1))
    assert whole.params - split.params == pytest.approx(2 * experts * (1 - 1 / 64), rel=1e-9)
    assert whole.grads - split.grads == pytest.approx(2 * experts * (1 - 1 / 64), rel=1e-9)
    assert split.optimizer == pytest.approx(whole.optimizer, rel=1e-9)  # 1/dp either way


def test_a_spec_gives_a_mixture_of_experts_shape_or_is_refused() -> None:
    """A whole shape's expert keys reach the planner (they were once accepted and dropped)."""
    from loom.planner.spec import parse_model

    shape = {"layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "ffn_hidden": 14336}
    shape.update(vocab=32000, seq_len=4096)
    dense = parse_model(shape)
    moe = parse_model({**shape, "experts": 8, "top_k": 2, "expert_ffn": 14336, "moe_layers": 32})
    assert moe.experts == 8 and moe.params() > 4 * dense.params()
    with pytest.raises(LoomError, match="top_k"):
        parse_model({**shape, "experts": 8, "expert_ffn": 14336, "moe_layers": 32})


def test_the_planner_charges_the_busiest_expert() -> None:
    """strategy.moe_imbalance (the busiest expert's tokens over the mean): under ep the
    all-to-all carries the busiest rank's tokens, and routed-expert compute grows by the
    routed share of the MLP only (attention, shared and dense parts stay)."""
    from dataclasses import replace

    from loom.core.presets import get_preset
    from loom.planner.cost import step_time
    from loom.planner.spec import parse_spec

    model = model_from_config(get_preset("qwen1.5-moe-a2.7b"), 4096)
    hw = gpu_hardware("h100", 8)
    even = Strategy(dp=8, ep=4, zero_stage=1, micro_batch=8, global_batch=64, framework="megatron")
    skewed = replace(even, moe_imbalance=1.5)
    a, b = step_time(model, hw, even), step_time(model, hw, skewed)
    assert b.expert_parallel > a.expert_parallel * 1.3  # volume × 1.5 (latency unchanged)
    assert a.compute < b.compute < a.compute * 1.5
    spec = {"model": "qwen1.5-moe-a2.7b", "hardware": {"gpu": "h100", "n_gpus": 8}}
    parsed = parse_spec(
        {**spec, "strategy": {"dp": 8, "ep": 4, "framework": "megatron", "moe_imbalance": 1.5}}
    )
    assert parsed.strategy is not None and (parsed.strategy.ep, parsed.strategy.moe_imbalance) == (
        4,
        1.5,
    )
    with pytest.raises(LoomError, match="moe_imbalance"):
        parse_spec({**spec, "strategy": {"dp": 8, "moe_imbalance": 0.5}})
