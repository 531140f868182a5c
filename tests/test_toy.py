import numpy as np
import pytest
import torch

from mtl_tune.benchmarks.toy import INITS, pareto_distance, pareto_front, pareto_set, toy_objectives


@pytest.mark.parametrize("x1,f1,f2", [(0.0, -15.092, -15.092), (1.4, -16.855, -12.937), (2.8, -18.226, -10.390),
                                      (4.2, -19.206, -7.451), (5.6, -19.794, -4.121), (7.0, -19.989, -0.398)])
def test_pareto_set_and_front_match_the_spec_table(x1, f1, f2):
    # docs/benchmarks.md#toy-pareto-set-and-front: x₂*(x₁) and the unscaled losses along the Pareto set
    x2 = {0.0: -8.35511, 1.4: -8.35850, 2.8: -8.36856, 4.2: -8.38494, 5.6: -8.40712, 7.0: -8.43446}[x1]
    ps = pareto_set(1001)
    row = ps[np.argmin(abs(ps[:, 0] - x1))]
    assert row[1] == pytest.approx(x2, abs=2e-5)
    losses = toy_objectives(torch.tensor([x1, x2], dtype=torch.float64), scale=1.0)
    assert losses.tolist() == pytest.approx([f1, f2], abs=2e-3)
    mirrored = toy_objectives(torch.tensor([-x1, x2], dtype=torch.float64), scale=1.0)
    assert mirrored.tolist() == pytest.approx([f2, f1], abs=2e-3)


def test_gradient_at_origin_is_not_zero():
    # docs/benchmarks.md#toy-losses: at (0, 0) both losses are 0 but ∇f₁ = ∇f₂ = (0, 10.856)
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    losses = toy_objectives(x, scale=1.0)
    assert losses.tolist() == [0.0, 0.0]
    for i in range(2):
        (g,) = torch.autograd.grad(losses[i], x, retain_graph=True)
        assert g.tolist() == pytest.approx([0.0, 10.856], abs=1e-3)


def test_scale_multiplies_only_the_first_loss():
    x = torch.tensor(INITS[3], dtype=torch.float64)
    a, b = toy_objectives(x, 1.0), toy_objectives(x, 0.1)
    assert b[0].item() == pytest.approx(0.1 * a[0].item())
    assert b[1].item() == pytest.approx(a[1].item())


def test_batched_points():
    xs = torch.tensor(INITS, dtype=torch.float64)
    batched = toy_objectives(xs)
    single = torch.stack([toy_objectives(x) for x in xs])
    torch.testing.assert_close(batched, single)


def test_pareto_distance():
    front = pareto_front(0.1, 101)
    assert np.allclose(pareto_distance(front), 0.0, atol=1e-3)
    # left of the front's end (its minimum of loss1) the nearest point is that end
    end = front[np.argmin(front[:, 0])]
    assert pareto_distance(np.array([end[0] - 1.0, end[1]])) == pytest.approx(1.0, abs=1e-3)
    # the single-task minima are the two ends of the front: −19.98943·scale and −19.98943
    assert front[:, 0].min() == pytest.approx(-1.998943, abs=1e-5)
    assert front[:, 1].min() == pytest.approx(-19.98943, abs=1e-4)


def test_search_start_follows_the_seed_unless_jitter_is_zero():
    from mtl_tune.benchmarks.toy import Toy, start_point

    toy = Toy()
    xs = [toy.build({"init": 0, "seed": s}, torch.device("cpu")).model.x.detach().numpy() for s in (0, 1, 0)]
    assert np.array_equal(xs[0], xs[2]) and not np.allclose(xs[0], xs[1])  # same seed, same start; new seed, new start
    offsets = np.array([np.subtract(start_point(1, s, 0.5), INITS[1]) for s in range(400)])
    assert abs(offsets.mean()) < 0.1 and abs(offsets.std() - 0.5) < 0.05  # N(0, 0.5²) per coordinate
    exact = toy.build({"init": 2, "seed": 7, "init_jitter": 0}, torch.device("cpu")).model.x.detach().numpy()
    assert tuple(exact) == INITS[2]
    assert toy.seed_changes_results({}) and not toy.seed_changes_results({"init_jitter": 0})
    with pytest.raises(ValueError, match="init_jitter"):
        start_point(0, 0, -1.0)
