"""Weight-only quantization: torchao's int8 (evaluation, GPU serving) and packed int8 / int4
layers on PyTorch's fused CPU kernels (`loom serve --quantize`, below).

torchao: each projection keeps its weight as int8 codes with one scale (and zero point) per
output row, about a quarter of the fp32 bytes. Activations stay in the model's dtype: torchao
converts the codes to that dtype for the matmul and scales its output per row, so the only error
is the rounding of the weights (`loom eval --quantize int8` measures it against fp32; see
BENCHMARKS.md). In eager mode that conversion makes a transient full-size copy of one weight per
call, so the saving is in resident memory, not speed — which is why serving on the CPU uses the
packed layers instead. Meant for inference: weights are frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import LoRALinear

MiB = 2**20


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass (torchao int8, NF4) is counted by the
    tensors inside it (codes, scales, zero points), not by the dtype it presents."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for n in names if (inner := getattr(t, n)) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared parameter once), quantized ones by their
    packed storage. `loom.core.lora.base_weight_bytes` knows NF4 only; this counts any
    torchao tensor."""
    return sum(tensor_bytes(p.detach()) for p in model.parameters())


def is_quantized(t: torch.Tensor) -> bool:
    """Whether a weight is stored as a tensor subclass (torchao's int8 or NF4), not plainly."""
    return is_traceable_wrapper_subclass(t)


@torch.no_grad()
def quantize_int8_weight_only(model: nn.Module) -> int:
    """Store every `nn.Linear` weight as int8 with per-row scales (torchao
    `Int8WeightOnlyConfig`), in place; returns how many layers were quantized.

    The embedding stays in its dtype, and so does the output projection of a model with tied
    embeddings: it has no `lm_head` and applies `embed_tokens.weight` through `F.linear`, and
    quantizing that shared weight would also change the embedding lookup. An untied `lm_head` is
    an `nn.Linear` and is quantized. Layers already quantized are left alone.

    LoRA layers are refused rather than skipped: their adapters would stay in full precision over
    a quantized base, a model that was never evaluated; fold them in with `merge_lora` first.
    """
    if any(p.is_meta for p in model.parameters()):
        raise LoomError(
            "cannot quantize a model on the meta device (no weights yet); load or initialise "
            "its weights first"
        )
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if lora:
        raise LoomError(
            f"the model holds {len(lora)} LoRA layer(s) (e.g. {lora[0]}); merge the adapters "
            "into the base weights first (loom.core.lora.merge_lora, or loom convert --merge)"
        )
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_quantized(m.weight)
    }
    # A wrapper holding a projection's weight itself (serving's multi-adapter layer) is not an
    # nn.Linear: quantize before wrapping. Name such layers rather than skip them silently.
    others = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if not isinstance(m, nn.Linear | nn.Embedding)
        and isinstance(weight := getattr(m, "weight", None), torch.Tensor)
        and weight.dim() == 2
        and not is_quantized(weight)
    ]
    if others:
        logger.warning(
            "int8 weight-only: %d layer(s) hold a matrix weight but are not nn.Linear and stay "
            "unquantized (quantize before wrapping them): %s",
            len(others),
            ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""),
        )
    before = weight_bytes(model)
    # set_inductor_config=False: leave torch.compile's process-wide settings as they are.
    quantize_(
        model,
        Int8WeightOnlyConfig(set_inductor_config=False),
        filter_fn=lambda m, name: name in targets,
    )
    after = weight_bytes(model)
    logger.info(
        "int8 weight-only: %d linear layers quantized; weights %.1f MiB -> %.1f MiB",
        len(targets),
        before / MiB,
        after / MiB,
    )
    return len(targets)


# -- Packed weight-only layers for serving (fused CPU kernels) -------------------------------
#
# torchao's int8 above converts the whole weight to the activation dtype on every call, so a
# decode step moves more bytes than fp32 does. Serving instead keeps each projection packed and
# multiplies with kernels that read the packed bytes:
#
# - int8 (one scale per output row): one row (a single sequence decoding) through a small
#   `torch.compile`d GEMV in fp32 (it reads the int8 codes once, at about memory speed; twice as
#   fast as the aten kernel on large matrices, but ≈ 40 µs a call, so small ones keep aten); a
#   few rows through `aten._weight_int8pack_mm` in bf16; many rows (prefill) convert the weight
#   and use the fp matmul, as there the matmul, not the weight bytes, is the cost.
# - int4 (groups of 32 along the input, a scale and a zero per group): always
#   `aten._weight_int4pack_mm_for_cpu` in bf16 (its fp32 path is 20x slower).
#
# The weight stays an `nn.Parameter` of the `nn.Linear` (a tensor subclass with the layer's
# shape and dtype), so anything calling `F.linear(x, layer.weight)` (serving's multi-adapter
# layer, which keeps its LoRA factors in the model dtype beside it) runs the kernel unchanged.
# The tied embedding, which is also the output projection, is stored in int8 in both modes:
# the lookup reads int8 rows, the output projection is the int8 kernel (llama.cpp's 4-bit files
# likewise keep `token_embd` at 8 bits).

SERVE_QUANTIZE = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what `_weight_int4pack_mm_for_cpu` takes
GEMV_ROWS = 1  # int8: rows up to which the compiled GEMV runs ...
GEMV_MIN_WEIGHTS = 2**19  # ... on matrices this large: it costs ≈ 40 µs a call, aten ≈ 5 µs
INT8_PACK_ROWS = 32  # int8: rows up to which `_weight_int8pack_mm` runs; beyond, dequantize
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default  # bound once: called per layer
_INT8_MM = torch.ops.aten._weight_int8pack_mm.default


class PackedWeight(torch.Tensor):
    """A frozen matrix weight [out, in] stored packed, presenting the model's shape and dtype.

    `F.linear` and `F.embedding` on it run the packed kernels; shape, dtype and device queries
    work as on any tensor; other operations are refused (`dequantize()` gives a plain copy),
    which keeps the packed bytes from being silently expanded."""

    INNER: tuple[str, ...] = ()
    kind = "packed"

    @staticmethod
    def __new__(cls, shape: torch.Size, dtype: torch.dtype, device: torch.device, *_: object):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=device, requires_grad=False
        )

    def __repr__(self) -> str:
        rows, cols = self.shape
        return f"{type(self).__name__}({rows}×{cols}, {self.dtype})"

    def __tensor_flatten__(self) -> tuple[list[str], object]:
        return list(self.INNER), self._context()

    def _context(self) -> object:
        return self.dtype

    # The format's own operations, defined by each subclass (Int8Weight, Int4Weight); the base
    # cannot be an ABC (torch.Tensor's metaclass), so a missing one raises.

    def _rewrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedWeight:
        """The same weight over `fn` of each inner tensor (detach, clone)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _rewrap")

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weightᵀ (+ bias) on the packed kernel."""
        raise NotImplementedError(f"{type(self).__name__} does not define linear")

    def dequantize(self) -> torch.Tensor:
        """A plain copy of the weight in the model's dtype."""
        raise NotImplementedError(f"{type(self).__name__} does not define dequantize")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        # Every projection of every step comes through here: the common case first, and short.
        if func is F.linear and len(args) > 1 and isinstance(args[1], PackedWeight):
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            if not isinstance(args[0], PackedWeight):
                return args[1].linear(args[0], bias)
        if func is F.embedding and len(args) > 1 and isinstance(args[1], PackedWeight):
            return args[1].embed(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            return args[0]._rewrap(lambda t: t)
        if func is aten.clone.default:
            return args[0]._rewrap(torch.clone)
        raise LoomError(
            f"{func} is not supported on a packed {cls.kind} weight (a frozen serving weight); "
            "call .dequantize() for a plain copy"
        )

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise LoomError(f"a packed {self.kind} weight cannot be an embedding table")


class Int8Weight(PackedWeight):
    """int8 codes [out, in] and one fp32 scale per output row: w = codes · scale."""

    INNER = ("codes", "scales")
    kind = "int8"

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes = codes
        self.scales = scales

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        return PackedWeight.__new__(cls, codes.shape, dtype, codes.device)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):  # type: ignore[no-untyped-def]
        return Int8Weight(inner["codes"], inner["scales"], ctx)

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per-row rounding (the largest magnitude of each row maps to ±127)."""
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(codes.contiguous(), scales.contiguous(), weight.dtype)

    def _rewrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int8Weight:
        return Int8Weight(fn(self.codes), fn(self.scales), self.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.codes.float() * self.scales[:, None]).to(self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        flat = x.reshape(-1, in_features)
        rows = flat.shape[0]
        # The aten kernel's bf16 path is wrong when `in` is not a multiple of 16 (and crashes on
        # odd widths) in torch 2.13; 32 keeps well clear of that.
        aten = rows <= INT8_PACK_ROWS and in_features % 32 == 0
        gemv = None
        if rows <= GEMV_ROWS and (not aten or self.codes.numel() >= GEMV_MIN_WEIGHTS):
            gemv = _int8_gemv()
        if gemv is not None:
            out = gemv(flat.float(), self.codes, self.scales)
        elif aten:
            out = _INT8_MM(flat.to(torch.bfloat16), self.codes, self.scales.to(torch.bfloat16))
        else:
            weight = self.codes.to(flat.dtype) * self.scales[:, None].to(flat.dtype)
            out = F.linear(flat, weight)
        out = out.to(x.dtype).view(*x.shape[:-1], out_features)
        return out if bias is None else out + bias

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].to(self.dtype) * self.scales[ids].unsqueeze(-1).to(self.dtype)


class Int4Weight(PackedWeight):
    """4-bit codes in `_convert_weight_to_int4pack_for_cpu`'s layout and, per group of
    `group_size` inputs of each row, a scale and a zero (bf16, [in / group, out, 2]):
    w = (code − 8) · scale + zero."""

    INNER = ("packed", "scales_and_zeros")
    kind = "int4"

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        shape: tuple[int, int],
        dtype: torch.dtype,
    ) -> None:
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros
        self.group_size = group_size
        self.features = shape  # (out, in) as ints: `self.shape` is a slower call on a subclass

    @staticmethod
    def __new__(cls, packed, scales_and_zeros, group_size, shape, dtype):  # type: ignore[no-untyped-def]
        return PackedWeight.__new__(cls, torch.Size(shape), dtype, packed.device)

    def _context(self) -> object:
        return (self.group_size, tuple(self.shape), self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):  # type: ignore[no-untyped-def]
        group_size, shape, dtype = ctx
        return Int4Weight(inner["packed"], inner["scales_and_zeros"], group_size, shape, dtype)

    @staticmethod
    def fits(shape: torch.Size | tuple[int, ...], group_size: int) -> bool:
        """Whether the kernel takes this weight: out a multiple of 16, in of the group size."""
        out_features, in_features = shape
        return out_features % 16 == 0 and in_features % group_size == 0

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        dtype: torch.dtype,
    ) -> Int4Weight:
        """From codes [out, in] in 0..15 and per-group scales and zeros [out, in / group]."""
        if group_size not in INT4_GROUP_SIZES:
            raise LoomError(f"int4 group size {group_size}: use one of {INT4_GROUP_SIZES}")
        if not cls.fits(codes.shape, group_size):
            raise LoomError(
                f"int4 needs out features a multiple of 16 and in features of {group_size}; "
                f"this weight is {tuple(codes.shape)}"
            )
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scales_and_zeros = torch.stack([scales.float(), zeros.float()], dim=-1)
        scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        return cls(packed, scales_and_zeros, group_size, tuple(codes.shape), dtype)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Weight:
        return cls.from_codes(*int4_round(weight, group_size), group_size, weight.dtype)

    def _rewrap(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Weight:
        return Int4Weight(
            fn(self.packed),
            fn(self.scales_and_zeros),
            self.group_size,
            tuple(self.shape),
            self.dtype,
        )

    def dequantize(self) -> torch.Tensor:
        """Through the kernel itself (its packed layout is its own): identity × W in fp32,
        the kernel's slow exact path — for checks, not for serving."""
        in_features = self.shape[1]
        eye = torch.eye(in_features, device=self.packed.device)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.group_size, self.scales_and_zeros.float()
        )
        return w_t.t().contiguous().to(self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_features, in_features = self.features
        flat = x.reshape(-1, in_features).to(torch.bfloat16)
        out = _INT4_MM(flat, self.packed, self.group_size, self.scales_and_zeros)
        out = out.to(x.dtype).view(*x.shape[:-1], out_features)
        return out if bias is None else out + bias


def int4_round(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric rounding per group (Q4_1's rule): its minimum maps to code 0, its maximum to
    15. Codes [out, in] and scales and zeros [out, in / group] for w = (code − 8) · scale + zero."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise LoomError(f"int4: {in_features} inputs are not groups of {group_size}")
    w = weight.detach().float().reshape(out_features, -1, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    codes = torch.round((w - low[..., None]) / scales[..., None]).clamp(0, 15)
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    return codes, scales, low + 8 * scales


def _int8_gemv_eager(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [1, in] (fp32) · int8 codes [out, in]ᵀ, scaled per row. Compiled, the conversion of
    the codes is fused into the reduction: each int8 byte is read once, nothing is stored."""
    return (x[:, None, :] * codes.float()).sum(-1) * scales


_GEMV: dict[str, Callable[..., torch.Tensor] | None] = {}


def _int8_gemv() -> Callable[..., torch.Tensor] | None:
    """The compiled int8 GEMV (compiled on first use), or None where compiling failed (then
    `_weight_int8pack_mm` serves single rows too). Dynamic shapes: one compilation serves
    every layer."""
    if "fn" not in _GEMV:
        _GEMV["fn"] = _compile_int8_gemv()
    return _GEMV["fn"]


def _compile_int8_gemv() -> Callable[..., torch.Tensor] | None:
    fn = torch.compile(_int8_gemv_eager, dynamic=True)
    try:
        x = torch.randn(1, 64)
        codes = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
        scales = torch.rand(48)
        got = fn(x, codes, scales)
        if not torch.allclose(got, _int8_gemv_eager(x, codes, scales), rtol=1e-4, atol=1e-3):
            raise RuntimeError("the compiled GEMV disagrees with the eager one")
    except Exception as e:  # no C++ compiler, an inductor failure: the aten kernel instead
        logger.warning("int8: compiling the one-row GEMV failed (%s); using the aten kernel", e)
        return None
    return fn


@torch.no_grad()
def quantize_for_serving(
    model: nn.Module,
    mode: str,
    group_size: int = 32,
    int4_source: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, int]:
    """Pack the model's weights for serving on the CPU, in place: every `nn.Linear` in `mode`
    (int8 per row, or int4 in groups of `group_size`), the output projection in int8 (a tied
    embedding too, which then serves lookups from its int8 rows). int4 layers the kernel cannot
    take (out not a multiple of 16, in not of the group) fall back to int8. `int4_source`
    (from `gguf_int4_codes`) gives codes to use as they are instead of rounding the weights.
    Returns how many matrices each format got."""
    if mode not in SERVE_QUANTIZE:
        raise LoomError(f"quantize {mode!r}: use one of {', '.join(SERVE_QUANTIZE)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise LoomError(f"int4 group size {group_size}: use one of {INT4_GROUP_SIZES}")
    params = list(model.parameters())
    if any(p.is_meta for p in params):
        raise LoomError(
            "cannot quantize a model on the meta device (no weights yet); load or initialise "
            "its weights first"
        )
    if any(p.device.type != "cpu" for p in params):
        raise LoomError(
            f"--quantize {mode} packs weights for PyTorch's CPU kernels; on a GPU serve "
            "unquantized (bf16)"
        )
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if lora:
        raise LoomError(
            f"the model holds {len(lora)} LoRA layer(s) (e.g. {lora[0]}); merge the adapters "
            "into the base weights first (loom.core.lora.merge_lora, or loom convert --merge)"
        )
    before = weight_bytes(model)
    counts = {"int8": 0, "int4": 0, "int4 from the file": 0}
    output = getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module.weight, PackedWeight):
            continue
        weight = module.weight
        source = (int4_source or {}).get(f"{name}.weight") if group_size == 32 else None
        packed: PackedWeight
        if mode == "int8" or module is output or not Int4Weight.fits(weight.shape, group_size):
            packed = Int8Weight.quantize(weight)
        elif source is not None:
            codes, scales, zeros = source
            rows = weight.shape[0]
            stored = (codes.view(rows, -1, 32).float() - 8) * scales[..., None] + zeros[..., None]
            if not torch.allclose(stored.view(weight.shape), weight.float(), 1e-2, 1e-4):
                raise LoomError(f"{name}: the GGUF's 4-bit codes do not match the loaded weight")
            packed = Int4Weight.from_codes(codes, scales, zeros, 32, weight.dtype)
            counts["int4 from the file"] += 1
        else:
            packed = Int4Weight.quantize(weight, group_size)
        counts[packed.kind] += 1
        module.weight = nn.Parameter(packed, requires_grad=False)
    embed = getattr(model, "embed_tokens", None)
    if (
        output is None
        and isinstance(embed, nn.Embedding)
        and not isinstance(embed.weight, PackedWeight)
    ):
        embed.weight = nn.Parameter(Int8Weight.quantize(embed.weight), requires_grad=False)
        counts["int8"] += 1
    warm_up(model)
    logger.info(
        "--quantize %s: %d int4 matrices (%d as the GGUF stores them), %d int8; weights "
        "%.1f MiB -> %.1f MiB",
        mode,
        counts["int4"],
        counts["int4 from the file"],
        counts["int8"],
        before / MiB,
        weight_bytes(model) / MiB,
    )
    return counts


def warm_up(model: nn.Module) -> None:
    """Run each packed shape once on one row: compiles the GEMV for it now rather than in the
    first request, and a kernel that fails, fails at load."""
    seen = set()
    for p in model.parameters():
        if isinstance(p, PackedWeight) and (key := (type(p), tuple(p.shape))) not in seen:
            seen.add(key)
            p.linear(torch.zeros(1, p.shape[1], dtype=p.dtype), None)
