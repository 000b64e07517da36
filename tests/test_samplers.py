"""Task samplers: frequencies (chi-square), the annealing schedule, state round trips, errors."""

import io

import pytest
import torch
from scipy import stats

from polytask import InvalidParameterError
from polytask.data import SAMPLERS

SIZES = {"small": 100, "mid": 1000, "big": 10000}
N = torch.tensor([100.0, 1000.0, 10000.0], dtype=torch.float64)
DRAWS = 10_000


def power(alpha: float) -> list[float]:
    p = N ** alpha
    return (p / p.sum()).tolist()


#: every registered sampler: (parameters, step, total_steps, the distribution its draws must follow),
#: the expected distribution computed from the formula, independently of the sampler's code.
CASES = {
    "proportional": ({}, 0, 1, power(1.0)),
    "uniform": ({}, 0, 1, [1 / 3] * 3),
    "temperature": ({"temperature": 3.0}, 0, 1, power(1 / 3)),
    "annealed": ({"start_temperature": 1.0, "end_temperature": 5.0}, 50, 101, power(1 - 0.8 * 0.5)),
    "round_robin": ({}, 0, 1, [1 / 3] * 3),
    "main_auxiliary": ({"main": "small", "ratio": 0.4}, 0, 1, [0.4, 0.6 * 1000 / 11000, 0.6 * 10000 / 11000]),
    "fixed": ({"weights": {"small": 2.0, "mid": 1.0, "big": 1.0}}, 0, 1, [0.5, 0.25, 0.25]),
}


def test_every_registered_sampler_is_covered():
    assert set(SAMPLERS.names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_frequencies_over_10000_draws_match_target_chi_square(name):
    params, step, total, expected = CASES[name]
    sampler = SAMPLERS.create(name, **params)
    sampler.setup(SIZES)
    gen = torch.Generator().manual_seed(0)
    cycle = name == "round_robin"  # deterministic in the step: draw i is step i
    draws = [sampler.sample(gen, i if cycle else step, total) for i in range(DRAWS)]
    observed = [draws.count(t) for t in SIZES]
    _, p_value = stats.chisquare(observed, [DRAWS * e for e in expected])
    assert p_value > 0.001, (name, observed, expected)
    if not cycle:  # round robin's probabilities are the step's (one-hot), not the long-run mix
        assert sampler.probabilities(step, total).tolist() == pytest.approx(expected)


def test_round_robin_cycles_in_task_order_as_a_function_of_the_step():
    sampler = SAMPLERS.create("round_robin")
    sampler.setup(SIZES)
    gen = torch.Generator()
    assert [sampler.sample(gen, s) for s in range(7)] == ["small", "mid", "big"] * 2 + ["small"]
    assert sampler.probabilities(4, 10).tolist() == [0.0, 1.0, 0.0]
    # replaying a step gives the same task: nothing hidden to checkpoint (mid-epoch resume replays draws)
    assert sampler.sample(gen, 4) == sampler.sample(gen, 4) == "mid" and sampler.state_dict() == {}


def test_annealed_follows_its_schedule():
    sampler = SAMPLERS.create("annealed", start_temperature=1.0, end_temperature=5.0)
    sampler.setup(SIZES)
    total = 1001
    # α(t) = 1 − 0.8·t/(T−1): Stickland & Murray's schedule, proportional at the start, τ = 5 at the end
    for step in (0, 250, 500, 1000):
        alpha = 1 - 0.8 * step / (total - 1)
        assert sampler.exponent(step, total) == pytest.approx(alpha)
        assert sampler.probabilities(step, total).tolist() == pytest.approx(power(alpha))
    assert sampler.probabilities(0, total).tolist() == pytest.approx(power(1.0))
    assert sampler.probabilities(5000, total).tolist() == pytest.approx(power(0.2))  # clipped after the end
    small = [float(sampler.probabilities(s, total)[0]) for s in range(0, total, 50)]
    assert all(a < b for a, b in zip(small, small[1:], strict=False))  # the small task gains steadily
    # the draws themselves follow the schedule: early ≈ proportional, late ≈ τ = 5
    gen = torch.Generator().manual_seed(1)
    for step, alpha in ((0, 1.0), (total - 1, 0.2)):
        draws = [sampler.sample(gen, step, total) for _ in range(DRAWS)]
        _, p_value = stats.chisquare([draws.count(t) for t in SIZES], [DRAWS * e for e in power(alpha)])
        assert p_value > 0.001
    single = SAMPLERS.create("annealed")
    single.setup(SIZES)
    assert single.probabilities(0, 1).tolist() == pytest.approx(power(0.2))  # one step: the end of the schedule


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_resumes_exactly(name):
    params, _, _, _ = CASES[name]
    first = SAMPLERS.create(name, **params)
    first.setup(SIZES)
    gen = torch.Generator().manual_seed(3)
    head = [first.sample(gen, s, 200) for s in range(100)]
    state, gen_state = roundtrip(first.state_dict()), gen.get_state()
    tail = [first.sample(gen, s, 200) for s in range(100, 200)]

    second = SAMPLERS.create(name, **params)
    second.setup(SIZES)
    second.load_state_dict(state)
    resumed_gen = torch.Generator()
    resumed_gen.set_state(gen_state)
    assert [second.sample(resumed_gen, s, 200) for s in range(100, 200)] == tail
    assert len(set(head + tail)) == 3


@pytest.mark.parametrize("name, params, message", [
    ("temperature", {"temperature": -1}, "`temperature` of `temperature` sampler must be > 0; found -1"),
    ("annealed", {"end_temperature": 0}, "`end_temperature` of `annealed` sampler must be > 0; found 0"),
    ("annealed", {"start_temperature": "hot"}, "`start_temperature` of `annealed` sampler must be > 0"),
    ("main_auxiliary", {"main": "a", "ratio": 1.5}, r"`ratio` of `main_auxiliary` sampler must be in \(0, 1\]; found 1.5"),
    ("main_auxiliary", {"main": "a", "auxiliary": "uniformm"}, "Did you mean 'uniform'"),
    ("fixed", {"weights": {"small": -1.0}}, "`weights` of `fixed` sampler must be finite and >= 0; found -1.0 for 'small'"),
    ("fixed", {"weights": {"small": 0.0}}, "must have a positive sum"),
    ("fixed", {"weights": [0.5, 0.5]}, "must map task names to numbers"),
])
def test_invalid_parameters_are_reported(name, params, message):
    with pytest.raises(InvalidParameterError, match=message):
        SAMPLERS.create(name, **params)


def test_task_names_are_checked_in_setup_with_did_you_mean():
    sampler = SAMPLERS.create("main_auxiliary", main="smal")
    with pytest.raises(InvalidParameterError, match="'smal', which is not a task. Did you mean 'small'"):
        sampler.setup(SIZES)
    fixed = SAMPLERS.create("fixed", weights={"small": 1.0, "mid": 1.0, "bigg": 1.0})
    with pytest.raises(InvalidParameterError, match="task 'bigg', which is not a task. Did you mean 'big'"):
        fixed.setup(SIZES)
    partial = SAMPLERS.create("fixed", weights={"small": 1.0, "mid": 1.0})
    with pytest.raises(InvalidParameterError, match="missing: big"):
        partial.setup(SIZES)
    with pytest.raises(InvalidParameterError, match=r"`main` of `main_auxiliary` sampler must be the main task's name \(required\)"):
        SAMPLERS.create("main_auxiliary")
    with pytest.raises(InvalidParameterError, match=r"`weights` of `fixed` sampler must map task names to numbers \(required\)"):
        SAMPLERS.create("fixed")


def test_main_auxiliary_alone_and_uniform_auxiliaries():
    alone = SAMPLERS.create("main_auxiliary", main="a", ratio=0.3)
    alone.setup({"a": 5})
    assert alone.probabilities(0, 1).tolist() == [1.0]
    uniform = SAMPLERS.create("main_auxiliary", main="big", ratio=0.5, auxiliary="uniform")
    uniform.setup(SIZES)
    assert uniform.probabilities(0, 1).tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_bench_sampling_smoke():
    from polytask.bench import sampling

    sizes = {"income": 400, "marital": 40, "hours": 4}
    results = sampling.run({"proportional": ("proportional", {}), "uniform": ("uniform", {})}, sizes=sizes, seeds=(0,),
                           epochs=1, batch_size=4, eval_size=50, echo=lambda line: None)
    proportional, uniform = results
    assert proportional.shares[0]["income"] > 0.85 and uniform.shares[0]["hours"] > 0.2
    table = sampling.format_results(results, sizes)
    assert "income auroc" in table and "hours r2" in table and len(table.splitlines()) == 4
    assert set(uniform.metrics[0]) == set(sizes)
