"""Simulated receive coils: unit-RSS smooth maps localised at their loops, correlated noise, ESC."""

import numpy as np
import pytest

from data.coils import (correlated_noise, emulated_single_coil, loop_array, noise_covariance,
                        sensitivity_maps)


def _maps(coils: int, n: int = 48):
    rng = np.random.default_rng(0)
    array = loop_array(rng, coils, ring_radius_mm=120.0)
    offsets = (np.arange(n) - n // 2) * (220.0 / n)
    y, x = np.meshgrid(-offsets, offsets, indexing="ij")
    inside = np.broadcast_to((x / 75) ** 2 + (y / 92) ** 2 < 1, (3, n, n))
    maps, correlation = sensitivity_maps(array, (np.array([-20.0, 0.0, 20.0]), -offsets, offsets),
                                         (2, 1, 0), inside)
    return array, maps, correlation, x, y, inside


@pytest.mark.parametrize("coils", [1, 8, 15])
def test_maps_have_unit_rss_and_the_requested_shape(coils: int) -> None:
    array, maps, correlation, *_ = _maps(coils)
    assert array.coils == coils and maps.shape == (coils, 3, 48, 48) and maps.dtype == np.complex64
    np.testing.assert_allclose(np.sqrt((np.abs(maps) ** 2).sum(axis=0)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(correlation), 1.0)
    np.testing.assert_allclose(correlation, correlation.conj().T, atol=1e-12)


def test_each_coil_sees_its_own_side_of_the_head_and_its_phase_is_smooth() -> None:
    array, maps, _, x, y, inside = _maps(8)
    for c in range(array.coils):
        magnitude = np.abs(maps[c, 1])
        strongest = np.unravel_index(np.argmax(np.where(inside[1], magnitude, 0)), magnitude.shape)
        towards = np.array([x[strongest], y[strongest]])
        assert towards @ array.normals[c, :2] > 0, f"coil {c} is brightest away from its loop"
        # Smooth phase: neighbouring pixels inside the head differ by far less than a radian.
        step = np.angle(maps[c, 1, :, 1:] * maps[c, 1, :, :-1].conj())[inside[1][:, 1:]]
        assert np.percentile(np.abs(step), 99) < 0.5


def test_noise_covariance_is_positive_definite_and_correlates_neighbours() -> None:
    array, _, correlation, *_ = _maps(8)
    covariance = noise_covariance(array, correlation)
    assert np.all(np.linalg.eigvalsh(covariance) > 0)
    coefficient = np.abs(covariance) / np.sqrt(np.outer(np.diag(covariance).real, np.diag(covariance).real))
    off = coefficient[~np.eye(8, dtype=bool)]
    assert 0.05 < off.mean() < 0.5 and off.max() < 0.9


def test_correlated_noise_has_the_covariance_it_is_given() -> None:
    array, _, correlation, *_ = _maps(4)
    covariance = noise_covariance(array, correlation)
    noise = correlated_noise(np.random.default_rng(1), covariance, (50, 4, 40, 40), sigma=0.5)
    assert noise.dtype == np.complex64
    samples = np.moveaxis(noise, 1, 0).reshape(4, -1)
    empirical = samples @ samples.conj().T / samples.shape[1]
    np.testing.assert_allclose(empirical, 2 * 0.25 * covariance, atol=0.01)


def test_emulated_single_coil_approximates_the_magnitude() -> None:
    _, maps, _, _, _, inside = _maps(8)
    magnitude = np.where(inside, 1.0, 0.0).astype(np.float32)
    coil_images = np.moveaxis(maps, 0, 1) * magnitude[:, None]
    weights = emulated_single_coil(coil_images, magnitude, inside)
    esc = np.abs(np.tensordot(coil_images, weights, axes=([1], [0])))
    # One fixed combination cannot be flat everywhere, but it follows the magnitude closely.
    assert np.median(np.abs(esc[inside] - 1.0)) < 0.2
