"""Serving an ONNX file with ONNX Runtime, adapted by the same policies as a torch model.

:class:`OnnxModel` is a :class:`~ttaserve.adapters.PreparedModel`: the engine, the
sessions and the policies use it exactly like a torch model. Its BatchNorm layers are
torch objects holding the graph's constants (policies read the source statistics from
them, e.g. to initialize UnMix-TNS components); a forward pass runs one ONNX Runtime
session, chosen by the normalizer active in the calling context (see
:mod:`ttaserve.handlers.onnx_rules`). Sessions are built on first use, one per rule, and
shared by every adaptation session (ONNX Runtime's ``run`` is thread-safe).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import torch
from torch import nn

from ttaserve.adapters.model import (
    AdaptiveBatchNorm2d,
    ModelError,
    PreparedModel,
    active_normalizer,
    observing,
    record_instance_moments,
)
from ttaserve.handlers.onnx_graph import BatchNormNode, GraphInfo, analyze
from ttaserve.handlers.onnx_rewrite import mean_name, rewrite, var_name
from ttaserve.handlers.onnx_rules import FEATURE_POLICIES, check_policy, rule_for

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
FUSED_HINT = (
    "Re-export it without fusion: `ttaserve export-onnx`, or torch.onnx.export(model, args, f, "
    "dynamo=False, do_constant_folding=False) (training=torch.onnx.TrainingMode.PRESERVE also "
    "keeps BatchNormalization); with the dynamo exporter pass optimize=False."
)


@dataclass(frozen=True)
class Variant:
    """One rewritten graph: its rule, and whether it reports moments and features."""

    rule: str  # a rule key, or "source" (BatchNorm nodes kept)
    moments: bool
    features: bool


def choose_providers(configured: list[str] | None) -> list[str]:
    """``configured`` if given (each must be available), else CUDA when onnxruntime-gpu
    and a GPU are both present, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if configured:
        missing = [p for p in configured if p not in available]
        if missing:
            raise ModelError(f"ONNX Runtime providers {missing} are not available here; available: {available}")
        return list(configured)
    if CUDA in available and torch.cuda.is_available():
        return [CUDA, CPU]
    return [CPU]


def _torch_layer(node: BatchNormNode) -> AdaptiveBatchNorm2d:
    bn = nn.BatchNorm2d(node.weight.shape[0], eps=node.eps, momentum=node.momentum)
    with torch.no_grad():
        for target, value in ((bn.weight, node.weight), (bn.bias, node.bias),
                              (bn.running_mean, node.mean), (bn.running_var, node.var)):
            target.copy_(torch.tensor(value))  # type: ignore[union-attr]
    bn.requires_grad_(False)
    return AdaptiveBatchNorm2d(bn.eval(), node.index, node.name)


class OnnxModel(PreparedModel):
    """An ONNX graph served by ONNX Runtime; see the module docstring."""

    runs_hooks: ClassVar[bool] = False  # only the normalizers onnx_rules.py has rules for

    def __init__(self, info: GraphInfo, providers: list[str], threads: int, source: str = "") -> None:
        layers = [_torch_layer(node) for node in info.layers]
        super().__init__(nn.ModuleList(layers).eval(), layers, info.num_classes, info.features or "")
        self.info = info
        self.providers = providers
        self.threads = threads
        self.source = source
        self._sessions: dict[Variant, Any] = {}
        self._build_lock = threading.Lock()
        self._session(Variant("source", False, False))  # fail at load, not on the first request

    # -- what the engine and the policies call ----------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, features=False)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.info.features is None:
            raise ModelError(self._no_features())
        features, logits = self._forward(x, features=True)
        assert features is not None
        return features.flatten(1), logits

    def bind(self, adapter: Any) -> Any:
        check_policy(adapter.name)
        if adapter.name in FEATURE_POLICIES and self.info.features is None:
            raise ModelError(self._no_features())
        adapter.check(self)
        return adapter

    def architecture(self) -> str:
        graph = self.info.model.graph
        ops = ",".join(n.op_type for n in graph.node)
        shapes = ";".join(f"{t.name}:{tuple(t.dims)}" for t in graph.initializer)
        return "onnx;" + hashlib.sha256(f"{ops}|{shapes}".encode()).hexdigest()

    def require_batchnorm(self, policy: str) -> None:
        if not self.bn_layers:
            fused = " (its BatchNorm was folded into the convolutions at export)" if self.info.convolutions else ""
            raise ModelError(f"policy {policy!r} adapts BatchNorm statistics, but this ONNX graph has no "
                             f"BatchNormalization node on a 4-D activation{fused}. {FUSED_HINT} "
                             "Meanwhile serve it with policy 'source'.")

    # -- running ----------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, features: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        hook = active_normalizer()
        rule = rule_for(hook)
        observe = observing()
        variant = Variant(rule.key if rule else "source", rule is not None or observe, features)
        session, names = self._session(variant)
        batch = int(x.shape[0])
        feeds = {self.info.input: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=self.info.input_dtype)}
        if rule is not None:
            feeds.update(rule.feeds(hook, self.bn_layers, batch))
        values = dict(zip(names, session.run(names, feeds)))
        if observe:
            for layer in self.bn_layers:
                record_instance_moments(layer, torch.from_numpy(values[mean_name(layer.index)]),
                                        torch.from_numpy(values[var_name(layer.index)]))
        if rule is not None:
            rule.collect(hook, self.bn_layers, values)
        feats = torch.from_numpy(values[self.info.features]) if features and self.info.features else None
        return feats, torch.from_numpy(values[self.info.output])

    def _session(self, variant: Variant) -> tuple[Any, list[str]]:
        entry = self._sessions.get(variant)
        if entry is None:
            with self._build_lock:
                entry = self._sessions.get(variant) or self._build(variant)
                self._sessions[variant] = entry
        return entry  # type: ignore[no-any-return]

    def _build(self, variant: Variant) -> tuple[Any, list[str]]:
        import onnxruntime as ort

        from ttaserve.handlers.onnx_rules import RULES

        rule = next((r for r in RULES.values() if r.key == variant.rule), None)
        graph = rewrite(self.info, rule, variant.moments, variant.features)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # unused BatchNorm initializers are dropped with a warning
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=self.providers)
        log.debug("ONNX Runtime session for %s (%s)", variant, self.source)
        return session, [o.name for o in graph.graph.output]

    def _no_features(self) -> str:
        return ("this ONNX graph has no Gemm/MatMul classifier head whose input ttaserve could use as "
                "the feature vector; name the feature tensor with \"features\" in config.json")


def load_onnx(path: str | Path, *, features: str | None = None, providers: list[str] | None = None,
              threads: int | None = None) -> OnnxModel:
    """An :class:`OnnxModel` from a file. ``threads``: ONNX Runtime intra-op threads
    (default: torch's thread count, which ``--torch-threads`` sets)."""
    info = analyze(onnx.load(str(path)), features)
    chosen = choose_providers(providers)
    model = OnnxModel(info, chosen, threads or torch.get_num_threads(), str(path))
    log.info("ONNX model %s: ONNX Runtime providers %s, %d adaptable BatchNorm layers, features %s",
             path, chosen, len(info.layers), info.features)
    if not info.layers and info.convolutions:
        log.warning("ONNX model %s has convolutions but no BatchNormalization: it looks fused, so "
                    "BatchNorm policies will be refused. %s", path, FUSED_HINT)
    return model
