"""Torch references against their definitions, and the Triton kernels against the references
on random inputs (under Triton's CPU interpreter here; on CUDA on a GPU machine)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.conftest import TritonKernels
from ttaserve.kernels import reference as ref
from ttaserve.kernels.norm import batch_moments

ALPHA_BN_CASES = [  # B, C, H, W, offsets
    (6, 3, 4, 4, [0, 1, 4, 6]),  # a segment of one sample
    (5, 37, 3, 5, None),  # C not a multiple of any block
    (3, 5, 1, 1, [0, 1, 2, 3]),  # one-sample segments, 1x1 maps: zero batch variance
    (2, 4, 33, 33, [0, 2]),  # rows longer than one block (Chan merge across blocks)
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bn_inputs(c: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    return torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)


def _unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


# --- references -----------------------------------------------------------------------


def test_alpha_bn_whole_batch_is_batch_norm_with_mixed_statistics() -> None:
    g = _gen()
    z = torch.randn(4, 3, 5, 5, generator=g)
    mean_s, var_s, w, b = _bn_inputs(3, g)
    mean_t, var_t = batch_moments(z)
    torch.testing.assert_close(var_t, torch.var_mean(z, dim=(0, 2, 3), correction=0)[0])
    expected = F.batch_norm(z, 0.3 * mean_s + 0.7 * mean_t, 0.3 * var_s + 0.7 * var_t, w, b, False, 0.0, 1e-5)
    assert torch.equal(ref.alpha_bn(z, None, mean_s, var_s, 0.3, w, b, 1e-5), expected)
    source = F.batch_norm(z, mean_s, var_s, w, b, False, 0.0, 1e-5)
    torch.testing.assert_close(ref.alpha_bn(z, None, mean_s, var_s, 1.0, w, b, 1e-5), source)


def test_alpha_bn_segments_are_normalized_alone() -> None:
    g = _gen(1)
    z = torch.randn(6, 3, 4, 4, generator=g)
    mean_s, var_s, w, b = _bn_inputs(3, g)
    offsets = [0, 1, 4, 6]
    out = ref.alpha_bn(z, offsets, mean_s, var_s, 0.2, w, b, 1e-5)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        alone = ref.alpha_bn(z[start:stop], [0, stop - start], mean_s, var_s, 0.2, w, b, 1e-5)
        assert torch.equal(out[start:stop], alone)
        whole = ref.alpha_bn(z[start:stop], None, mean_s, var_s, 0.2, w, b, 1e-5)
        torch.testing.assert_close(alone, whole, rtol=1e-5, atol=1e-5)


def test_unmix_with_one_component_is_instance_normalization() -> None:
    g = _gen(2)
    inst_mean, inst_var = torch.randn(5, 7, generator=g), torch.rand(5, 7, generator=g)
    mean, var, p = ref.unmix_moments(inst_mean, inst_var, torch.randn(1, 7, generator=g), torch.rand(1, 7, generator=g), 0.07)
    assert torch.equal(p, torch.ones(5, 1))
    assert torch.equal(mean, inst_mean) and torch.equal(var, inst_var)


def test_unmix_matches_the_per_sample_formula() -> None:
    g = _gen(3)
    b, k, c, tau = 3, 4, 6, 0.1
    inst_mean, inst_var = torch.randn(b, c, generator=g), torch.rand(b, c, generator=g)
    means, variances = torch.randn(k, c, generator=g), torch.rand(k, c, generator=g)
    mean, var, p = ref.unmix_moments(inst_mean, inst_var, means, variances, tau)
    for i in range(b):
        cos = torch.stack([F.cosine_similarity(inst_mean[i], means[j], dim=0) for j in range(k)])
        p_i = torch.softmax(cos / tau, dim=0)
        mu = torch.stack([(1 - p_i[j]) * means[j] + p_i[j] * inst_mean[i] for j in range(k)])
        sig = torch.stack([(1 - p_i[j]) * variances[j] + p_i[j] * inst_var[i] for j in range(k)])
        torch.testing.assert_close(p[i], p_i)
        torch.testing.assert_close(mean[i], mu.mean(0))
        torch.testing.assert_close(var[i], sig.mean(0) + (mu**2).mean(0) - mu.mean(0) ** 2, atol=1e-5, rtol=1e-5)


def test_knn_vote_matches_a_brute_force_vote() -> None:
    g = _gen(4)
    query, keys = _unit_rows(4, 8, g), _unit_rows(30, 8, g)
    labels = torch.randint(0, 5, (30,), generator=g)
    scores = ref.knn_vote(query, keys, labels, 6, 0.1, 5)
    for i in range(4):
        sims = keys @ query[i]
        order = sorted(range(30), key=lambda j: -float(sims[j]))[:6]
        weights = torch.softmax(sims[order] / 0.1, dim=0)
        expected = torch.zeros(5)
        for w, j in zip(weights, order):
            expected[labels[j]] += w
        torch.testing.assert_close(scores[i], expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(4))


def test_knn_vote_is_adanpc_scoring_before_its_floor() -> None:
    from ttaserve.adapters.adanpc import SCORE_FLOOR, knn_scores

    g = _gen(5)
    features, keys = torch.randn(5, 8, generator=g), _unit_rows(40, 8, g)
    labels = torch.randint(0, 3, (40,), generator=g)
    vote = ref.knn_vote(F.normalize(features, dim=1), keys, labels, 7, 0.1, 3)
    assert torch.equal(knn_scores(features, [(keys, labels)], 7, 0.1, 3), (vote + SCORE_FLOOR).clamp(max=1.0))


# --- Triton against the references ---------------------------------------------------


@pytest.fixture(scope="module")
def tk(triton_kernels: TritonKernels) -> TritonKernels:
    return triton_kernels


def _on(tk: TritonKernels, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(tk.device) for t in tensors]


def _cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cpu() for t in tensors]


@pytest.mark.parametrize("b, c, h, w, offsets", ALPHA_BN_CASES)
@pytest.mark.parametrize("alpha, affine", [(0.1, True), (0.0, False)])
def test_triton_alpha_bn(tk: TritonKernels, b: int, c: int, h: int, w: int, offsets: list[int] | None, alpha: float, affine: bool) -> None:
    g = _gen(b * c)
    z = 3.0 * torch.randn(b, c, h, w, generator=g) + 2.0
    mean_s, var_s, weight, bias = _bn_inputs(c, g)
    w_opt, b_opt = (weight, bias) if affine else (None, None)
    expected = ref.alpha_bn(z, offsets, mean_s, var_s, alpha, w_opt, b_opt, 1e-5)
    zd, md, vd, wd, bd = _on(tk, z, mean_s, var_s, w_opt, b_opt)
    out = tk.module.alpha_bn(zd, offsets, md, vd, alpha, wd, bd, 1e-5)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_triton_alpha_bn_is_stable_far_from_zero(tk: TritonKernels) -> None:
    # A naive sum / sum-of-squares variance would lose most digits at mean 1e3, std 1e-1.
    g = _gen(6)
    z = 1e3 + 0.1 * torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    mean_s, var_s, w, b = _bn_inputs(3, g)
    expected = ref.alpha_bn(z, [0, 1, 4], mean_s.double(), var_s.double(), 0.0, w.double(), b.double(), 1e-5)
    out = tk.module.alpha_bn(*_on(tk, z.float()), [0, 1, 4], *_on(tk, mean_s, var_s), 0.0, *_on(tk, w, b), 1e-5)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=0.0, atol=5e-3)


@pytest.mark.parametrize("b, k, c", [(3, 1, 5), (4, 5, 37), (2, 16, 300)])
def test_triton_unmix_moments(tk: TritonKernels, b: int, k: int, c: int) -> None:
    g = _gen(b + k + c)
    inst_mean, inst_var = torch.randn(b, c, generator=g), torch.rand(b, c, generator=g)
    inst_mean[0] = 0.0  # a zero vector: cosine guarded as F.normalize does
    means, variances = torch.randn(k, c, generator=g), torch.rand(k, c, generator=g)
    expected = ref.unmix_moments(inst_mean, inst_var, means, variances, 0.07)
    out = tk.module.unmix_moments(*_on(tk, inst_mean, inst_var, means, variances), 0.07)
    for got, want in zip(_cpu(*out), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b, n, d, k", [(3, 50, 20, 5), (17, 300, 16, 2), (2, 7, 16, 8)])
def test_triton_knn_topk(tk: TritonKernels, b: int, n: int, d: int, k: int) -> None:
    g = _gen(b + n)
    query, keys = _unit_rows(b, d, g), _unit_rows(n, d, g)
    values, index = _cpu(*tk.module.knn_topk(*_on(tk, query, keys), k))
    want_values, want_index = ref.knn_topk(query, keys, k)
    assert torch.equal(index, want_index)
    torch.testing.assert_close(values, want_values)


def test_triton_knn_vote_and_ties(tk: TritonKernels) -> None:
    g = _gen(7)
    query = _unit_rows(3, 16, g)
    keys = torch.cat([_unit_rows(20, 16, g), query[:1], query[:1]])  # two exact ties
    labels = torch.randint(0, 4, (22,), generator=g)
    scores = tk.module.knn_vote(*_on(tk, query, keys, labels), 3, 0.1, 4).cpu()
    torch.testing.assert_close(scores, ref.knn_vote(query, keys, labels, 3, 0.1, 4))
    _, index = _cpu(*tk.module.knn_topk(*_on(tk, query, keys), 2))
    assert index[0].tolist() == [20, 21]  # ties go to the lower index
