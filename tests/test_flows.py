"""The shared coupling block: exact inverse, log-det equal to log|det J| from autograd, seeded permutations."""

from __future__ import annotations

import math

import pytest
import torch

from detect.models.components.flows import (
    AffineCouplingBlock,
    FlowSequence,
    conv_subnet,
    gaussian_log_likelihood,
    gaussian_nll,
    linear_subnet,
)


def _flow(channels: int, subnet, *, seed: int = 0, blocks: int = 3, condition_channels: int = 0, **kwargs
          ) -> FlowSequence:
    generator = torch.Generator().manual_seed(seed)
    flow = FlowSequence([AffineCouplingBlock(channels, subnet, condition_channels=condition_channels,
                                             generator=generator, **kwargs) for _ in range(blocks)])
    flow.reset_parameters(generator)
    with torch.no_grad():  # move away from the identity init so the test is not trivial
        for block in flow.blocks:
            for p in block.subnet.parameters():
                p.mul_(8.0)
            block.global_scale.add_(torch.randn(block.global_scale.shape, generator=generator))
            block.global_offset.add_(torch.randn(block.global_offset.shape, generator=generator))
    return flow.double()


CASES = [
    pytest.param(dict(channels=5, subnet=linear_subnet(2.0), shape=(4, 5)), id="vector-hard"),
    pytest.param(dict(channels=6, subnet=linear_subnet(2.0), shape=(4, 6), permute_soft=True,
                      clamp_activation="atan", clamp=1.9), id="vector-soft-atan"),
    pytest.param(dict(channels=4, subnet=linear_subnet(2.0), shape=(3, 4), condition_channels=3), id="vector-cond"),
    pytest.param(dict(channels=3, subnet=conv_subnet(3, 1.0), shape=(2, 3, 4, 4)), id="conv3x3"),
    pytest.param(dict(channels=4, subnet=conv_subnet(1, 1.0), shape=(2, 4, 3, 3), permute_soft=True,
                      condition_channels=2), id="conv1x1-soft-cond"),
]


def _condition(case: dict, generator: torch.Generator) -> torch.Tensor | None:
    cc = case.get("condition_channels", 0)
    if not cc:
        return None
    shape = (case["shape"][0], cc, *case["shape"][2:])
    return torch.randn(shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES)
def test_inverse_recovers_input(case):
    case = dict(case)
    shape, channels, subnet = case.pop("shape"), case.pop("channels"), case.pop("subnet")
    flow = _flow(channels, subnet, **case)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    cond = _condition({**case, "shape": shape}, generator)
    z, log_det = flow(x, cond)
    assert z.shape == x.shape and log_det.shape == (shape[0],)
    assert not torch.allclose(z, x)
    x_back, log_det_back = flow(z, cond, reverse=True)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(log_det_back, -log_det, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_log_det_matches_autograd_jacobian(case):
    case = dict(case)
    shape, channels, subnet = case.pop("shape"), case.pop("channels"), case.pop("subnet")
    flow = _flow(channels, subnet, **case)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    cond = _condition({**case, "shape": shape}, generator)
    _, log_det = flow(x, cond)
    for i in range(shape[0]):  # samples are independent: the Jacobian of one sample's output w.r.t. its input
        xi = x[i:i + 1]
        ci = cond[i:i + 1] if cond is not None else None
        jac = torch.autograd.functional.jacobian(lambda v, ci=ci: flow(v, ci)[0], xi, vectorize=True)
        d = xi.numel()
        _, logabsdet = torch.linalg.slogdet(jac.reshape(d, d))
        assert log_det[i].item() == pytest.approx(logabsdet.item(), rel=1e-8, abs=1e-8)


def test_permutation_is_seeded_and_soft_permutation_is_a_rotation():
    def block(seed: int, soft: bool) -> AffineCouplingBlock:
        return AffineCouplingBlock(16, linear_subnet(), permute_soft=soft,
                                   generator=torch.Generator().manual_seed(seed))

    assert torch.equal(block(0, False).perm, block(0, False).perm)
    assert not torch.equal(block(0, False).perm, block(1, False).perm)
    assert sorted(block(0, False).perm.tolist()) == list(range(16))
    rotation = block(3, True).rotation.double()
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.linalg.det(rotation).item() == pytest.approx(1.0, abs=1e-5)


def test_soft_clamp_bounds_the_log_scale():
    blk = AffineCouplingBlock(4, linear_subnet(), clamp=1.5, global_affine=False)
    with torch.no_grad():
        for p in blk.subnet.parameters():
            p.mul_(1e4)
    x = torch.randn(64, 4) * 10
    _, log_det = blk(x)
    assert log_det.abs().max().item() <= 2 * 1.5 + 1e-5  # two coupled channels, each |s| < clamp


def test_identity_at_init_and_gaussian_helpers():
    blk = AffineCouplingBlock(4, linear_subnet(), global_affine=True, generator=torch.Generator().manual_seed(0))
    scale = blk._global_scale()
    torch.testing.assert_close(scale, torch.ones_like(scale))
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    log_det = torch.tensor([0.5, -1.0])
    expected = torch.tensor([-2.5 - math.log(2 * math.pi) + 0.5, -math.log(2 * math.pi) - 1.0])
    torch.testing.assert_close(gaussian_log_likelihood(z, log_det), expected)
    torch.testing.assert_close(gaussian_nll(z, log_det), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(gaussian_nll(z, log_det, constant=True), -expected)
    # per-position log-likelihood of a map: sum over channels only
    zmap = torch.zeros(2, 3, 4, 5)
    assert gaussian_log_likelihood(zmap, 0.0, dim=1).shape == (2, 4, 5)


def test_unconditional_block_rejects_missing_condition():
    blk = AffineCouplingBlock(4, linear_subnet(), condition_channels=2)
    with pytest.raises(ValueError, match="condition"):
        blk(torch.zeros(1, 4))


def test_data_dependent_actnorm_initialisation_standardises_outputs():
    generator = torch.Generator().manual_seed(0)
    flow = FlowSequence([AffineCouplingBlock(6, linear_subnet(), condition_channels=2, generator=generator)
                         for _ in range(3)])
    flow.reset_parameters(generator)
    x = 5.0 * torch.randn(512, 6, generator=generator) + 3.0
    cond = torch.randn(512, 2, generator=generator)
    flow.initialize_global_affine(x, cond)
    z, _ = flow(x, cond)
    torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(6), atol=1e-3, rtol=0)
    x_back, _ = flow(z, cond, reverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-5)


def test_frozen_features_cached_or_recomputed_give_the_same_rows() -> None:
    import torch

    from detect.models.components.training import FrozenFeatures

    pixels = torch.rand(5, 3, 8, 8)
    calls = []

    def stages(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(len(x))
        return [x.mean(1, keepdim=True), x[:, :, ::2, ::2]]

    cached = FrozenFeatures(stages, pixels, batch_size=2)
    assert cached.cached and calls == [1, 2, 2, 1]  # the probe, then the batches in order
    streamed = FrozenFeatures(stages, pixels, batch_size=2, budget=10)
    assert not streamed.cached
    index = torch.tensor([4, 0, 2])
    for a, b in zip(cached(index), streamed(index), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    single = FrozenFeatures(lambda x: x.sum(1), pixels, batch_size=3)
    torch.testing.assert_close(single(index), pixels[index].sum(1), rtol=0, atol=0)
