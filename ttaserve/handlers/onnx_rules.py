"""Which policies run on ONNX Runtime, and each normalization rule written for it.

This is the one place to touch to let a policy run on an ONNX model. The policies
themselves do not change: their ``forward`` calls the model under a normalizer (see
:func:`ttaserve.adapters.normalizer`), as on torch. :class:`~ttaserve.handlers.onnx_model.OnnxModel`
looks up the active normalizer's type here and

1. runs a graph in which every BatchNorm computes the rule's statistics
   (:meth:`OnnxRule.statistics`, emitted once per graph with the ``onnx`` library),
2. feeds it the session's data (:meth:`OnnxRule.feeds`: alpha, UnMix-TNS components ...),
3. hands back what the graph computed for the policy's own update (:meth:`OnnxRule.collect`).

All mutable state stays in the session's ``TensorState``; the update after the forward is
the policy's own torch code, so snapshot, restore, reset and isolation are those of the
torch path. To add a normalization policy: write an ``OnnxRule`` for its normalizer class,
add it to ``RULES`` and the policy to ``POLICIES``. Policies that need gradients or a
second set of weights cannot be expressed as a graph rule and are refused with
:data:`UNSUPPORTED`'s reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ttaserve.adapters.alpha_bn import AlphaBNNorm
from ttaserve.adapters.graded_bn import GradedNorm
from ttaserve.adapters.model import AdaptiveBatchNorm2d, Unsupported
from ttaserve.adapters.unmix_tns import UnMixNorm
from ttaserve.handlers.onnx_rewrite import PREFIX, Emitter, LayerNodes, mean_name, var_name
from ttaserve.kernels.norm import pooled_moments

# Registered policy names that run on ONNX Runtime (aliases such as tbn resolve to these).
POLICIES = ("source", "alpha-bn", "unmix-tns", "adanpc", "graded-bn")
# Policies that read the classifier head's input (a named graph output).
FEATURE_POLICIES = ("adanpc",)
UNSUPPORTED = {
    "tent": "it trains BatchNorm parameters by backpropagation, which an ONNX Runtime inference "
            "session cannot do",
    "ecotta": "it trains meta networks beside the encoder by backpropagation, which an ONNX "
              "Runtime inference session cannot do",
    "t3": "it merges the weights of two torch models per sample",
    "t3-b": "it merges the weights of two torch models per batch",
}
SUPPORT_HINT = ("On ONNX models use one of source, graded-bn, alpha-bn, tbn, unmix-tns, adanpc; to use {policy}, "
                "serve the PyTorch model instead ('factory' + 'weights' or a torch.export 'program' "
                "in config.json).")


class OnnxRule(Protocol):
    key: ClassVar[str]  # names the rewritten graph (one ORT session per rule)

    def statistics(self, em: Emitter, layer: LayerNodes) -> tuple[str, str]:
        """Emit the layer's per-sample statistics ([B, C] mean and variance)."""

    def feeds(self, hook: Any, layers: Sequence[AdaptiveBatchNorm2d], batch: int) -> dict[str, np.ndarray]:
        """The graph inputs for one run, from the normalizer (and so the session state)."""

    def collect(self, hook: Any, layers: Sequence[AdaptiveBatchNorm2d], outputs: Mapping[str, np.ndarray]) -> None:
        """Give the normalizer what the graph computed (e.g. for its state update)."""


def _scalar(value: float) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def segment_matrix(batch: int, offsets: Sequence[int] | None) -> np.ndarray:
    """[B, B] averaging matrix: row b holds 1/n over the n samples of b's segment, so
    ``S @ x`` gives every sample its segment's mean (the whole batch when no offsets)."""
    offsets = list(offsets) if offsets is not None else [0, batch]
    matrix = np.zeros((batch, batch), dtype=np.float32)
    for a, b in zip(offsets[:-1], offsets[1:]):
        matrix[a:b, a:b] = 1.0 / (b - a)
    return matrix


class AlphaBNRule:
    """alpha-bn / tbn: m = alpha * source + (1 - alpha) * batch (per request segment)."""

    key: ClassVar[str] = "alpha-bn"

    def statistics(self, em: Emitter, layer: LayerNodes) -> tuple[str, str]:
        segments = em.input(f"{PREFIX}/segments", ["batch", "batch"])
        alpha = em.input(f"{PREFIX}/alpha", [])
        rest = em.shared("one_minus_alpha", lambda: em.op("Sub", em.const(1.0), alpha))
        batch_mean = em.op("MatMul", segments, layer.inst_mean)
        deviation = em.op("Sub", layer.inst_mean, batch_mean)
        # Batch variance = segment mean of (instance variance + squared deviation of the
        # instance mean): the two-pass result, without a second pass over the activation.
        within = em.op("Add", layer.inst_var, em.op("Mul", deviation, deviation))
        batch_var = em.op("MatMul", segments, within)
        mean = em.op("Add", em.op("Mul", alpha, layer.source_mean), em.op("Mul", rest, batch_mean))
        var = em.op("Add", em.op("Mul", alpha, layer.source_var), em.op("Mul", rest, batch_var))
        return mean, var

    def feeds(self, hook: AlphaBNNorm, layers: Sequence[AdaptiveBatchNorm2d], batch: int) -> dict[str, np.ndarray]:
        return {f"{PREFIX}/alpha": _scalar(hook.alpha),
                f"{PREFIX}/segments": segment_matrix(batch, hook.offsets)}

    def collect(self, hook: AlphaBNNorm, layers: Sequence[AdaptiveBatchNorm2d],
                outputs: Mapping[str, np.ndarray]) -> None:
        """Stateless: nothing to hand back."""


def _components(index: int, what: str) -> str:
    return f"{PREFIX}/bn{index}/{what}"


def p_name(index: int) -> str:
    return f"{PREFIX}/bn{index}/p"


class UnMixRule:
    """unmix-tns: per-sample statistics un-mixed from the session's K components (steps 1-5
    of :mod:`ttaserve.adapters.unmix_tns`); the soft assignment p is an output, and the
    component update (step 6) is the policy's own code, after the run."""

    key: ClassVar[str] = "unmix-tns"

    def statistics(self, em: Emitter, layer: LayerNodes) -> tuple[str, str]:
        index, channels = layer.layer.index, int(layer.layer.mean.shape[0])
        means = em.input(_components(index, "means"), ["components", channels])
        variances = em.input(_components(index, "vars"), ["components", channels])
        tau = em.input(f"{PREFIX}/tau", [])
        cosine = em.op("MatMul", em.l2_normalize(layer.inst_mean),
                       em.op("Transpose", em.l2_normalize(means), perm=[1, 0]))
        p = em.op("Softmax", em.op("Div", cosine, tau), axis=1, out=p_name(index))
        em.output(p, ["batch", "components"])
        w = em.unsqueeze(p, [2])  # B x K x 1
        keep = em.op("Sub", em.const(1.0), w)
        mixed_mean = em.op("Add", em.op("Mul", keep, means), em.op("Mul", w, em.unsqueeze(layer.inst_mean, [1])))
        mixed_var = em.op("Add", em.op("Mul", keep, variances), em.op("Mul", w, em.unsqueeze(layer.inst_var, [1])))
        mean = em.reduce("ReduceMean", mixed_mean, [1], 0)
        spread_dev = em.op("Sub", mixed_mean, em.unsqueeze(mean, [1]))
        spread = em.reduce("ReduceMean", em.op("Mul", spread_dev, spread_dev), [1], 0)
        return mean, em.op("Add", em.reduce("ReduceMean", mixed_var, [1], 0), spread)

    def feeds(self, hook: UnMixNorm, layers: Sequence[AdaptiveBatchNorm2d], batch: int) -> dict[str, np.ndarray]:
        feeds = {f"{PREFIX}/tau": _scalar(hook.params.tau)}
        for layer in layers:
            means, variances = hook.components(layer.index)
            feeds[_components(layer.index, "means")] = _array(means)
            feeds[_components(layer.index, "vars")] = _array(variances)
        return feeds

    def collect(self, hook: UnMixNorm, layers: Sequence[AdaptiveBatchNorm2d],
                outputs: Mapping[str, np.ndarray]) -> None:
        for layer in layers:
            i = layer.index
            hook.record(layer, torch.from_numpy(outputs[mean_name(i)]), torch.from_numpy(outputs[var_name(i)]),
                        torch.from_numpy(outputs[p_name(i)]))


class GradedRule:
    """graded-bn: each layer mixes the batch's moments with the session's running estimate,
    weight w_l (a graph input, so the graph is the same for every session); the batch
    moments are rebuilt from the instance-moment outputs for the policy's own commit."""

    key: ClassVar[str] = "graded-bn"

    def statistics(self, em: Emitter, layer: LayerNodes) -> tuple[str, str]:
        index, channels = layer.layer.index, int(layer.layer.mean.shape[0])
        weight = em.input(_components(index, "weight"), [])
        est_mean = em.input(_components(index, "est_mean"), [channels])
        est_var = em.input(_components(index, "est_var"), [channels])
        batch_mean = em.reduce("ReduceMean", layer.inst_mean, [0], 1)
        deviation = em.op("Sub", layer.inst_mean, batch_mean)
        batch_var = em.reduce("ReduceMean", em.op("Add", layer.inst_var, em.op("Mul", deviation, deviation)), [0], 1)
        delta = em.op("Sub", batch_mean, est_mean)
        keep = em.op("Sub", em.const(1.0), weight)
        mean = em.op("Add", est_mean, em.op("Mul", weight, delta))
        spread = em.op("Mul", em.op("Mul", weight, keep), em.op("Mul", delta, delta))
        var = em.op("Add", em.op("Add", em.op("Mul", weight, batch_var), em.op("Mul", keep, est_var)), spread)
        ones = em.op("Mul", layer.inst_mean, em.const(0.0))  # [B, C] zeros: broadcast to per-sample
        return em.op("Add", ones, mean), em.op("Add", ones, var)

    def feeds(self, hook: GradedNorm, layers: Sequence[AdaptiveBatchNorm2d], batch: int) -> dict[str, np.ndarray]:
        feeds = {}
        for layer in layers:
            mean, var = hook.estimate(layer)
            feeds[_components(layer.index, "weight")] = _scalar(hook.weight(layer, batch))
            feeds[_components(layer.index, "est_mean")] = _array(mean)
            feeds[_components(layer.index, "est_var")] = _array(var)
        return feeds

    def collect(self, hook: GradedNorm, layers: Sequence[AdaptiveBatchNorm2d],
                outputs: Mapping[str, np.ndarray]) -> None:
        for layer in layers:
            hook.record(layer, *pooled_moments(torch.from_numpy(outputs[mean_name(layer.index)]),
                                               torch.from_numpy(outputs[var_name(layer.index)])))


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32)


RULES: dict[type, OnnxRule] = {AlphaBNNorm: AlphaBNRule(), UnMixNorm: UnMixRule(), GradedNorm: GradedRule()}


def rule_for(hook: Any) -> OnnxRule | None:
    """The rule of the active normalizer (None: source statistics)."""
    if hook is None:
        return None
    # A normalizer is a callable value (AlphaBNNorm) or the bound method of one pass's
    # normalization object; the rule belongs to that value's type.
    rule = RULES.get(type(getattr(hook, "__self__", hook)))
    if rule is None:
        raise Unsupported(f"normalizer {type(hook).__name__} has no ONNX Runtime rule "
                          "(ttaserve/handlers/onnx_rules.py)")
    return rule


def check_policy(policy: str) -> None:
    """Raise Unsupported, naming what supports ``policy``, if it cannot run on ONNX Runtime."""
    if "+" in policy:  # a composition (normalization + prediction policy): every part must run
        for part in policy.split("+"):
            check_policy(part)
        return
    if policy in POLICIES:
        return
    reason = UNSUPPORTED.get(policy, "it has no ONNX Runtime rule")
    raise Unsupported(f"policy {policy!r} is not available for a model served by ONNX Runtime: {reason}. "
                      + SUPPORT_HINT.format(policy=policy))
