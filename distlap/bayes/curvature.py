"""The exact diagonal of the GGN of a softmax classifier, fast: a laplace-torch curvature backend.

    diag GGN = sum_n diag(J_n^T Lambda_n J_n),   Lambda_n = diag(p_n) - p_n p_n^T = S_n S_n^T,
    S_n = diag(sqrt p_n) - p_n sqrt(p_n)^T,

so diag GGN_theta = sum_n sum_k (d/dtheta sum_c f_nc S_nck)^2: C backward passes per batch, each giving
per-example gradients. Those come from module hooks: for a layer y = a W^T + b applied to every token
t, the gradient of example n is sum_t g_nt a_nt^T (sum over tokens *before* squaring). ASDL's diag
squares per token instead, which is a different (and on a ViT, inexact) quantity; laplace-torch's
Curvlinops path is exact but forms full Jacobians (vmap over classes), 5-10x slower on CPU.

Covers ``nn.Linear`` (LoRA factors, any dense layer) and ``nn.LayerNorm`` (LN tuning, hybrid's
LayerNorm copies); a posterior over any other module type is refused with the backend to use instead.

At C = 100 classes the C backward passes dominate the fit. Any factorisation Lambda_n ~ S_n S_n^T with
K columns costs K passes instead (``estimator``, :func:`loss_factors`):

    ggn  S_n = diag(sqrt p_n) - p_n sqrt(p_n)^T                  K = C, exact
    mc   S_n = [p_n - e_{y_nm}]_m / sqrt(M),  y_nm ~ p(y | x_n)  K = M, unbiased: E[(p - e_y)(p - e_y)^T]
         = Lambda_n (the Monte-Carlo GGN, i.e. the Fisher with labels sampled from the model)
    ef   S_n = p_n - e_{y_n}, y_n the true label                 K = 1, the empirical Fisher: squared
         per-example loss gradients; biased, it is the GGN only where p(y | x) is the labels' own
         distribution (Kunstner et al. 2019, "Limitations of the empirical Fisher approximation")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from laplace.curvature import CurvatureInterface
from torch import nn
from torch.nn import functional as F

# Per-example gradients of a module's own parameters: (input, grad of output, module) -> {name: (B, *shape)}
_PerExample = Callable[[torch.Tensor, torch.Tensor, nn.Module], dict[str, torch.Tensor]]


def _linear(a: torch.Tensor, g: torch.Tensor, module: nn.Linear) -> dict[str, torch.Tensor]:
    a, g = a.flatten(1, -2) if a.dim() > 2 else a[:, None], g.flatten(1, -2) if g.dim() > 2 else g[:, None]
    out = {"weight": torch.einsum("bto,bti->boi", g, a)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _layer_norm(a: torch.Tensor, g: torch.Tensor, module: nn.LayerNorm) -> dict[str, torch.Tensor]:
    normalized = F.layer_norm(a, module.normalized_shape, eps=module.eps)
    dims = tuple(range(1, a.dim() - len(module.normalized_shape)))  # token dims, summed per example
    out = {}
    if module.weight is not None:
        out["weight"] = (g * normalized).sum(dims) if dims else g * normalized
    if module.bias is not None:
        out["bias"] = g.sum(dims) if dims else g
    return out


PER_EXAMPLE: dict[type, _PerExample] = {nn.Linear: _linear, nn.LayerNorm: _layer_norm}

Estimator = Literal["ggn", "mc", "ef"]


def loss_factors(
    f: torch.Tensor,
    y: torch.Tensor,
    estimator: Estimator = "ggn",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, C, K) columns s_nk with sum_k s_nk s_nk^T = Lambda_n (ggn), = it in expectation (mc), or the
    outer product of the loss gradient in the logits (ef); see the module docstring. fp32."""
    p = torch.softmax(f.detach().float(), dim=-1)  # (B, C)
    if estimator == "ggn":
        root = p.sqrt()
        return torch.diag_embed(root) - p[:, :, None] * root[:, None, :]  # (B, C, C)
    if estimator == "ef":
        return (p - F.one_hot(y.to(p.device), p.shape[-1]).to(p))[:, :, None]  # (B, C, 1)
    if estimator == "mc":
        labels = torch.multinomial(p, mc_samples, replacement=True, generator=generator)  # (B, M)
        onehot = F.one_hot(labels, p.shape[-1]).to(p).transpose(1, 2)  # (B, C, M)
        return (p[:, :, None] - onehot) / math.sqrt(mc_samples)
    raise ValueError(f"unknown curvature estimator {estimator!r} (ggn, mc, ef)")


class ExactDiagGGN(CurvatureInterface):
    """laplace-torch backend: ``diag`` is the GGN diagonal for classification from exact per-example
    gradients (see module doc); ``estimator`` ggn (exact), mc (``mc_samples`` labels drawn per example,
    seeded by ``seed``) or ef (the empirical Fisher), passed as laplace-torch's ``backend_kwargs``."""

    def __init__(
        self,
        model: nn.Module,
        likelihood,
        last_layer: bool = False,
        subnetwork_indices=None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        estimator: Estimator = "ggn",
        mc_samples: int = 1,
        seed: int = 0,
    ):
        if likelihood != "classification" or last_layer or subnetwork_indices is not None:
            raise ValueError(
                "ExactDiagGGN covers the classification likelihood over trainable parameters "
                "only (no last_layer, no subnetwork_indices)"
            )
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self._owners = self._owning_modules()
        self.estimator, self.mc_samples, self.seed = estimator, mc_samples, seed
        self._generator: torch.Generator | None = None  # made on the logits' device at the first batch

    def _factors(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:func:`loss_factors` of a batch; mc draws from one seeded stream across the batches of a fit."""
        if self.estimator == "mc" and self._generator is None:
            self._generator = torch.Generator(device=f.device).manual_seed(self.seed)
        return loss_factors(f, y, self.estimator, self.mc_samples, self._generator)

    def _owning_modules(self) -> dict[str, tuple[nn.Module, str]]:
        """{parameter name: (module holding it directly, its attribute name)} for the trainable ones."""
        owners = {}
        for module_name, module in self.model.named_modules():
            for attr, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                name = f"{module_name}.{attr}" if module_name else attr
                if type(module) not in PER_EXAMPLE:
                    raise ValueError(
                        f"laplace.backend=exact: parameter {name} belongs to a "
                        f"{type(module).__name__}, which it does not cover (only "
                        f"{', '.join(t.__name__ for t in PER_EXAMPLE)}); use laplace.backend=curvlinops"
                    )
                owners[name] = (module, attr)
        return owners

    def diag(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        modules = {id(m): m for m, _ in self._owners.values()}
        calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in modules}

        def record(module, inputs, output):
            calls[id(module)].append((inputs[0].detach(), output))

        handles = [m.register_forward_hook(record) for m in modules.values()]
        try:
            with torch.enable_grad():
                f = self.model(x)
        finally:
            for h in handles:
                h.remove()
        s = self._factors(f, y).to(f.dtype)  # (B, C, K): S S^T = Lambda (or its estimate)
        flat = [(key, a, out) for key, seen in calls.items() for a, out in seen]
        outputs = [out for *_, out in flat]
        diag = {name: torch.zeros_like(self.params_dict[name]) for name in self.params_dict}
        for k in range(s.shape[-1]):
            grads = torch.autograd.grad((f * s[:, :, k]).sum(), outputs, retain_graph=k < s.shape[-1] - 1)
            per_example: dict[int, dict[str, torch.Tensor]] = {}
            for (key, a, _), g in zip(flat, grads, strict=True):
                module = modules[key]
                for attr, value in PER_EXAMPLE[type(module)](a, g.detach(), module).items():
                    acc = per_example.setdefault(key, {})
                    acc[attr] = acc[attr] + value if attr in acc else value  # modules called twice
            for name, (module, attr) in self._owners.items():
                diag[name] += per_example[id(module)][attr].pow(2).sum(0)
        loss = self.factor * self.lossfunc(f.detach(), y)
        return loss, torch.cat([diag[name].reshape(-1) for name in self.params_dict])
