"""Shapley values and greedy block sets (distlap.bayes.shapley) against brute force: the permutation
definition of the Shapley value enumerated over all L! orders, closed forms of pairwise games, and the
GLM subsets of the tiny ViT scored one subset at a time with distlap.metrics."""

import itertools
import math

import numpy as np
import pytest
import torch
from laplace_peer import CPU, fit, loader, lora_model, lora_names

from distlap.bayes.glm import glm_pass, param_blocks, probit_probs
from distlap.bayes.shapley import (
    all_masks,
    best_sets,
    bits,
    exact_shapley,
    glm_values,
    greedy_sets,
    permutation_shapley,
    reported_on,
    shapley,
)
from distlap.metrics import expected_calibration_error, negative_log_likelihood


def table_game(values):
    """A value function that looks every mask up in a table of 2^L values."""
    return lambda masks: values[bits(masks)]


def random_game(n, seed=0):
    return np.random.default_rng(seed).normal(size=2**n)


def pairwise_game(w, interaction):
    """v(S) = sum_{i in S} w_i + sum_{i<j in S} I_ij; its Shapley value is w_i + 1/2 sum_j I_ij."""
    upper = np.triu(interaction, 1)
    return lambda masks: masks @ w + np.einsum("si,ij,sj->s", masks, upper, masks)


def brute_force_shapley(value_of, n):
    """Average over all n! orders of each player's marginal contribution (the definition)."""
    phi = np.zeros(n)
    for order in itertools.permutations(range(n)):
        s = frozenset()
        for i in order:
            phi[i] += value_of(s | {i}) - value_of(s)
            s = s | {i}
    return phi / math.factorial(n)


def of_set(values):
    return lambda s: values[sum(1 << i for i in s)]


def test_all_masks_index_is_the_bitmask():
    masks = all_masks(4)
    assert masks.shape == (16, 4) and (bits(masks) == np.arange(16)).all()
    assert masks[0b1010].tolist() == [False, True, False, True]


def test_exact_equals_the_permutation_definition():
    values = random_game(5)
    phi = exact_shapley(values)
    np.testing.assert_allclose(phi, brute_force_shapley(of_set(values), 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 6, 12])
def test_efficiency(n):
    values = random_game(n, seed=n)
    assert abs(exact_shapley(values).sum() - (values[-1] - values[0])) < 1e-9


def test_pairwise_game_closed_form():
    rng = np.random.default_rng(1)
    w, interaction = rng.normal(size=7), rng.normal(size=(7, 7))
    interaction = interaction + interaction.T
    np.fill_diagonal(interaction, 0)
    phi, se = shapley(pairwise_game(w, interaction), 7)
    np.testing.assert_allclose(phi, w + interaction.sum(1) / 2, rtol=0, atol=1e-12)
    assert (se == 0).all()


def test_permutation_estimates_cover_the_exact_values():
    values = random_game(6, seed=3)
    exact = exact_shapley(values)
    phi, se = permutation_shapley(table_game(values), 6, n_permutations=2000, seed=0)
    assert (np.abs(phi - exact) <= 3 * se).all(), (phi - exact) / se
    assert (se > 0).all() and se.max() < 0.1 * np.abs(exact).max()  # tight enough to mean something
    assert abs(phi.sum() - (values[-1] - values[0])) < 1e-9  # every order is efficient
    again, _ = permutation_shapley(table_game(values), 6, n_permutations=2000, seed=0)
    other, _ = permutation_shapley(table_game(values), 6, n_permutations=2000, seed=1)
    assert np.array_equal(phi, again) and not np.array_equal(phi, other)


def test_many_players_are_sampled():
    """Past 16 players ``auto`` samples orders; checked on a pairwise game's closed form."""
    rng = np.random.default_rng(2)
    w, interaction = rng.normal(size=20), rng.normal(size=(20, 20)) * 0.3
    interaction = interaction + interaction.T
    np.fill_diagonal(interaction, 0)
    phi, se = shapley(pairwise_game(w, interaction), 20, n_permutations=400, seed=0)
    exact = w + interaction.sum(1) / 2
    assert (se > 0).all() and (np.abs(phi - exact) <= 3 * se).all()
    with pytest.raises(ValueError, match="method"):
        shapley(pairwise_game(w, interaction), 20, method="owen")


def naive_greedy(value_of, n):
    chosen, curve = frozenset(), []
    for _ in range(n):
        best = max(sorted(set(range(n)) - chosen), key=lambda i: (value_of(chosen | {i}), -i))
        chosen = chosen | {best}
        curve.append((tuple(sorted(chosen)), value_of(chosen)))
    return curve


def test_greedy_and_best_sets_against_brute_force():
    values = random_game(6, seed=4)
    greedy = greedy_sets(table_game(values), 6)
    assert [(s.blocks, s.value) for s in greedy] == naive_greedy(of_set(values), 6)
    best = best_sets(values)
    for step in best:
        combos = itertools.combinations(range(6), step.size)
        assert step.value == max(of_set(values)(frozenset(c)) for c in combos)
        assert of_set(values)(frozenset(step.blocks)) == step.value
    assert all(g.value <= b.value for g, b in zip(greedy, best, strict=True))
    w = np.array([0.3, -0.1, 0.7, 0.2, 0.0, 0.5])  # additive: greedy is optimal
    additive = greedy_sets(pairwise_game(w, np.zeros((6, 6))), 6)
    assert [s.blocks for s in additive[:3]] == [(2,), (2, 5), (0, 2, 5)]


def test_sets_chosen_on_one_table_are_reported_with_the_other():
    """best_sets / greedy on a validation table, each set's value read off a test table by hand."""
    on_val, on_test = random_game(5, seed=6), random_game(5, seed=7)
    for steps in (best_sets(on_val), greedy_sets(table_game(on_val), 5)):
        rows = reported_on(steps, table_game(on_test), 5)
        assert [(r.size, r.blocks, r.val_value) for r in rows] == [(s.size, s.blocks, s.value) for s in steps]
        assert [r.value for r in rows] == [of_set(on_test)(frozenset(s.blocks)) for s in steps]
    assert reported_on([], table_game(on_test), 5) == []


@pytest.mark.parametrize("metric", ["ece", "nll"])
def test_glm_block_shapley_equals_brute_force_on_the_tiny_vit(metric):
    """Delta_ECE / Delta_NLL of every block subset from one pass, against each subset's probit predictive
    scored alone by distlap.metrics and the Shapley definition over all 4! orders."""
    model = lora_model()
    la = fit(model, lora_names(model), "diag", "exact")
    table = glm_pass(model, la, param_blocks(model, la), loader(n=40, seed=6, batch_size=16), CPU)
    score = {"ece": expected_calibration_error, "nll": negative_log_likelihood}[metric]
    base = score(torch.softmax(table.logits, -1), table.labels)
    brute = np.array(
        [
            base
            - score(
                probit_probs(table.logits, table.variances, [b for b in range(4) if r >> b & 1]), table.labels
            )
            for r in range(16)
        ]
    )  # v(S) = metric_MAP - metric_S
    value = glm_values(table.logits, table.variances, table.labels, metric)
    values = value(all_masks(4))
    np.testing.assert_allclose(values, brute, rtol=0, atol=1e-12)
    phi, _ = shapley(value, 4)
    np.testing.assert_allclose(phi, brute_force_shapley(of_set(brute), 4), rtol=0, atol=1e-12)
    assert values[0] == 0 and abs(phi.sum() - values[-1]) < 1e-9 and abs(values[-1]) > 1e-4
