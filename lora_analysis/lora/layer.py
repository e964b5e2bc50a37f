"""One LoRA layer: a frozen base Linear (or Hugging Face Conv1D) plus a trainable low-rank update.

    h = base(x) + scaling * lora_B(lora_A(dropout(x)))        (unmerged)
    h = x @ (W + ΔW)ᵀ + b,   ΔW = scaling * B @ A            (merged)

Shapes follow the LoRA paper and PEFT: ``lora_A.weight`` is A: (r, in), ``lora_B.weight`` is B: (out, r),
so ΔW = scaling·B·A has the (out, in) shape of an ``nn.Linear`` weight. ``scaling`` is alpha / r, or
alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023).

Hugging Face ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``) stores its weight transposed, as
(in, out); its delta is transposed the same way (PEFT's ``fan_in_fan_out=True``).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

INIT_METHODS = ("kaiming", "gaussian", "pissa")


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` without importing transformers (it is optional here)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_adaptable(module: nn.Module) -> bool:
    """Layers LoRA can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D, whatever its storage orientation."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(out_features), int(in_features)
    return int(module.out_features), int(module.in_features)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) whatever its storage (Conv1D keeps (in, out)); a view, not a copy."""
    return module.weight.T if is_conv1d(module) else module.weight


def compute_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """alpha / r (LoRA paper) or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def validate_hyperparameters(name: str, rank: int, alpha: float, dropout: float, out_features: int,
                             in_features: int, init: str = "kaiming") -> None:
    """Raise ``ValueError`` naming the module and the allowed range for any bad LoRA setting.

    Any rank >= 1 is a valid layer (PEFT loads adapters with r > min(in, out)); capping a new adapter's rank
    at min(in, out) is a creation-time policy, :func:`~.config.effective_rank_alpha`. PiSSA needs r
    singular directions, so it alone requires r <= min(in, out).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is not allowed for module '{name}': rank must be an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha={alpha!r} is not allowed for module '{name}': alpha must be a finite number > 0")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is not allowed: dropout must be in [0, 1)")
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} is not allowed: choose one of {', '.join(INIT_METHODS)}")
    if init == "pissa" and rank > min(out_features, in_features):
        raise ValueError(f"rank={rank} is not allowed for module '{name}' ({out_features}x{in_features}) with "
                         f"init='pissa': PiSSA takes r singular directions, at most min(in, out) = "
                         f"{min(out_features, in_features)}")


class LoRADropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from ``generator`` when one is given (a run's own random numbers,
    not the process-wide RNG). The mask is drawn on the generator's device and moved to the input's."""

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__(p)
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is None or not self.training:
            return super().forward(x)
        keep = torch.empty(x.shape, device=self.generator.device).bernoulli_(1 - self.p, generator=self.generator)
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.p)


class LoRALinear(nn.Module):
    """A frozen ``base_layer`` (Linear or Conv1D) with a low-rank update ``scaling * lora_B @ lora_A``.

    Attributes follow the paper and PEFT: ``rank`` (r), ``alpha``, ``scaling``, ``lora_A`` (Linear in→r,
    weight (r, in)), ``lora_B`` (Linear r→out, weight (out, r)), ``lora_dropout``, ``merged``. ``weight`` and
    ``bias`` are the base layer's (host models read them, e.g. T5 and ``nn.MultiheadAttention``).
    ``generator``, when given, supplies A's random init and the dropout masks instead of the global RNG.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", name: str = "",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not is_adaptable(base_layer):
            raise ValueError(f"module '{name}' is a {type(base_layer).__name__}: LoRA wraps only nn.Linear "
                             "and transformers Conv1D layers")
        out_features, in_features = linear_shape(base_layer)
        validate_hyperparameters(name or type(base_layer).__name__, rank, alpha, dropout,
                                 out_features, in_features, init)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.rank, self.alpha, self.rslora, self.init = rank, float(alpha), bool(rslora), init
        self.scaling = compute_scaling(rank, float(alpha), rslora)
        self.generator = generator
        self.lora_dropout = LoRADropout(dropout, generator) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        # skip_init: no draw from the global RNG here; reset_lora_parameters fills both factors
        self.lora_A = nn.utils.skip_init(nn.Linear, in_features, rank, bias=False, device=weight.device,
                                         dtype=torch.float32)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, out_features, bias=False, device=weight.device,
                                         dtype=torch.float32)
        self.merged = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        if weight.device.type != "meta":
            self.reset_lora_parameters(init)

    # ---- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """kaiming: A ~ Kaiming-uniform(a=√5), B = 0 (ΔW = 0, outputs unchanged at step 0; PEFT's default).
        gaussian: A ~ N(0, 1/r), B = 0.
        pissa: A, B from the top-r SVD of W (Meng et al. 2024); W is replaced by the residual so the
        layer's output is still unchanged at step 0.
        """
        if init == "kaiming":
            self._draw_a(lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "gaussian":
            self._draw_a(lambda t, g: nn.init.normal_(t, std=1.0 / self.rank, generator=g))
            nn.init.zeros_(self.lora_B.weight)
        elif init == "pissa":
            weight = weight_out_in(self.base_layer).to(torch.float32)
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            r = self.rank
            sqrt_s = (s[:r] / self.scaling).sqrt()
            self.lora_B.weight.copy_(u[:, :r] * sqrt_s)          # (out, r)
            self.lora_A.weight.copy_(sqrt_s[:, None] * vh[:r])    # (r, in)
            residual = weight - self.scaling * self.lora_B.weight @ self.lora_A.weight
            weight_out_in(self.base_layer).copy_(residual)     # a view: W keeps its orientation and dtype
            # kept to save the adapter as plain LoRA against the original W (see adapter_io)
            self.pissa_init = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())
        else:
            raise ValueError(f"init={init!r} is not allowed: choose one of {', '.join(INIT_METHODS)}")

    def _draw_a(self, init_) -> None:
        """Fill A with ``init_(tensor, generator)``, drawn on the generator's device when there is one."""
        a, g = self.lora_A.weight, self.generator
        draw = torch.empty(a.shape, dtype=a.dtype, device=g.device if g is not None else a.device)
        init_(draw, g)
        a.copy_(draw)

    # ---- the wrapped layer, as host code sees it ------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (unchanged by LoRA unless merged), as PEFT's wrapper exposes it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # ---- the update ---------------------------------------------------------------------------
    def update_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), detached, whose scaling·B·A is the update this layer adds to the pretrained W: its own
        factors, or for PiSSA (which moved W to the residual) the rank-2r [B, −B0]·[A; A0], as its saved
        adapter holds them."""
        a, b = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if self.init == "pissa" and getattr(self, "pissa_init", None) is not None:
            a0, b0 = self.pissa_init
            a, b = torch.cat([a, a0.to(a)]), torch.cat([b, -b0.to(b)], dim=1)
        return a, b

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scaling·B·A in float32, in the base weight's orientation ((out, in); (in, out) for Conv1D)."""
        delta = self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + ΔW, computed in float32 and cast back to W's dtype. Refuses non-finite results."""
        if self.merged:
            warnings.warn("LoRA layer is already merged; merge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        merged = (weight.float() + self.delta_weight()).to(weight.dtype)   # checked after the cast: fp16 overflows
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging would produce NaN or inf weights in {weight.dtype} (non-finite values, or "
                             "an overflow of the weight's dtype); the layer was left unmerged")
        weight.data.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W − ΔW, the inverse of :meth:`merge` (exact up to the rounding of W's dtype)."""
        if not self.merged:
            warnings.warn("LoRA layer is not merged; unmerge() did nothing", stacklevel=2)
            return
        weight = self.base_layer.weight
        weight.data.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        # add in float32 and round once, as PEFT does (rounding the update first would round twice)
        return (result + update * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}")
