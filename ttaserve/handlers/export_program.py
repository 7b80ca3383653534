"""Loading ``torch.export`` programs (.pt2) so that policies can adapt them.

An exported graph has no modules: BatchNorm and the classifier are functional aten calls.
We turn every 4-D ``aten.batch_norm`` back into an ``nn.BatchNorm2d`` submodule and the
last ``aten.linear`` into an ``nn.Linear`` named ``head``; :func:`prepare` then swaps and
taps them like those of any other module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

_BN_TARGETS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}


def load_program(path: str | Path) -> nn.Module:
    """An eval-mode module from a .pt2 file, with BatchNorm2d and the head as modules."""
    program = torch.export.load(str(path))
    return modularize(program.module())


def _tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise ValueError(f"expected a parameter or buffer, got {node}")
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return torch.as_tensor(value).detach().clone()


def _replace(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module, arg: fx.Node) -> None:
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (arg,))
    if node.target is torch.ops.aten._native_batch_norm_legit_no_training.default:
        for user in list(node.users):  # the op returns (out, mean, rstd); users take [0]
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _batchnorm(gm: fx.GraphModule, node: fx.Node) -> nn.BatchNorm2d:
    if node.target is torch.ops.aten.batch_norm.default:
        _, w, b, mean, var, _, momentum, eps = node.args[:8]
    else:
        _, w, b, mean, var, momentum, eps = node.args[:7]
    running_mean, running_var = _tensor(gm, mean), _tensor(gm, var)
    assert running_mean is not None and running_var is not None
    bn = nn.BatchNorm2d(running_mean.numel(), eps=float(eps), momentum=float(momentum),  # type: ignore[arg-type]
                        affine=w is not None)
    with torch.no_grad():
        bn.running_mean.copy_(running_mean)  # type: ignore[union-attr]
        bn.running_var.copy_(running_var)  # type: ignore[union-attr]
    if w is not None:
        bn.weight.data.copy_(_tensor(gm, w))  # type: ignore[arg-type]
        bn.bias.data.copy_(_tensor(gm, b))  # type: ignore[arg-type]
    return bn.eval()


def modularize(gm: fx.GraphModule) -> fx.GraphModule:
    bn_nodes = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target in _BN_TARGETS
        and getattr(n.args[0].meta.get("val"), "dim", lambda: 0)() == 4
    ]
    for i, node in enumerate(bn_nodes):
        _replace(gm, node, f"bn{i}", _batchnorm(gm, node), node.args[0])
    linears = [n for n in gm.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    if linears:
        node = linears[-1]
        x, w, b = (list(node.args) + [None])[:3]
        weight, bias = _tensor(gm, w), _tensor(gm, b)
        assert weight is not None
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        head.weight.data.copy_(weight)
        if bias is not None:
            head.bias.data.copy_(bias)
        _replace(gm, node, "head", head, x)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    # The exported module refuses .eval()/.train(); a plain GraphModule over the same graph
    # and attributes behaves like any nn.Module.
    return fx.GraphModule(gm, gm.graph).eval()
