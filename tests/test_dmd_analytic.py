"""DMD2 on an exact teacher (``diffalign/algorithms/dmd_analytic.py``): the rectified flow to an 8-mode ring of
Gaussians distilled into 1- and 4-step MLP students, judged by the energy distance to fresh data draws.

Sampling floor: two independent 4000-draw data sets are about 5e-4 apart (the estimator is a U-statistic, so it
can go slightly negative). The teacher's 40-step Euler ODE is at that floor, its naive 4 steps about 0.04 off and
its 1 step about 2.2 (every sample near the mixture's mean); ``docs/dmd.md`` ("Analytic check") has the numbers.
"""

import pytest
import torch

from diffalign.algorithms.dmd_analytic import (
    AnalyticDMDConfig,
    euler_samples,
    fit_teacher,
    student_samples,
    train_student,
)
from diffalign.config import ConfigError
from diffalign.steering.analytic import GaussianMixture, energy_distance

pytestmark = pytest.mark.usefixtures("one_thread")

N = 4000
FOUR_STEPS = [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.fixture(scope="module")
def setting():
    """The mixture, fresh data draws, the teacher-fitted initial MLP, and the evaluation generator."""
    mixture = GaussianMixture.ring(8, radius=3.0, std=0.4)
    init, losses = fit_teacher(mixture, AnalyticDMDConfig(), torch.Generator().manual_seed(0))
    assert losses[-1] < 0.1 * losses[0]
    return mixture, mixture.sample(N, torch.Generator().manual_seed(123)), init


def distance(x, data):
    return energy_distance(x.reshape(x.shape[0], -1), data)


@pytest.mark.parametrize(("sigmas", "bound"), [([1.0, 0.0], 0.02), (FOUR_STEPS, 0.01)], ids=["1-step", "4-step"])
def test_dmd_student_matches_the_data_and_beats_naive_euler(setting, sigmas, bound):
    mixture, data, init = setting
    ev = torch.Generator().manual_seed(7)
    floor = distance(mixture.sample(N, ev), data)
    teacher_40 = distance(euler_samples(mixture, 40, N, ev), data)
    teacher_4 = distance(euler_samples(mixture, 4, N, ev), data)
    teacher_same = distance(euler_samples(mixture, len(sigmas) - 1, N, ev), data)
    before = distance(student_samples(init, sigmas, N, 2, ev), data)

    student, curves = train_student(mixture, AnalyticDMDConfig(sigmas=sigmas), init)
    after = distance(student_samples(student, sigmas, N, 2, ev), data)

    assert abs(floor) < 3e-3 and abs(teacher_40) < 3e-3  # the exact teacher's ODE is at the sampling floor
    assert after < bound, (after, before)
    assert after <= teacher_40 + bound
    # the teacher's naive Euler at the student's step count, and at 4 steps, is measurably worse
    assert teacher_same > after + 0.02 and teacher_4 > after + 0.015, (teacher_same, teacher_4, after)
    assert before > after + 0.02  # DMD, not the teacher fit, closed the gap
    assert len(curves["fake"]) == 5 * len(curves["dm"]) == 5 * 400


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match="'sigmas'"):
        AnalyticDMDConfig(sigmas=[1.0, 0.5])
    with pytest.raises(ConfigError, match="'sigmas'"):
        AnalyticDMDConfig(sigmas=[0.8, 0.0])
    with pytest.raises(ConfigError, match="'stop'"):
        AnalyticDMDConfig(stop="first")
