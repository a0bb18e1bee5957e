"""Issue 13 item 6: two mutations of the code that no test used to notice.

- removing the ``max_ratio`` clamp of the v2 allocation (``compression.allocation._spread``);
- reversing the camera-loss weights over the refinement iterations (``camera_loss``: the last
  iteration weighs 1, earlier ones ``γ^(K-1-k)``).

Each was checked by applying the mutation and seeing the test below fail.
"""

from __future__ import annotations

import pytest
import torch

from compression.allocation import v2_ratios


def test_v2_ratios_are_clamped_at_max_ratio_and_keep_the_mean():
    # three layers of one type; layer 0 keeps almost all energy in two singular values, so its
    # weight -log(loss) is ~90x the others' and its unclamped ratio would be ~1.47
    shapes = {f"blocks.{i}.fc": (8, 8) for i in range(3)}
    flat = torch.ones(8)
    spiky = torch.tensor([1.0, 1.0] + [1e-6] * 6)
    spectra = {"blocks.0.fc": spiky, "blocks.1.fc": flat, "blocks.2.fc": flat}
    ratios = v2_ratios(shapes, spectra, ratio=0.5, max_ratio=0.6)
    assert max(ratios.values()) <= 0.6
    assert ratios["blocks.0.fc"] == pytest.approx(0.6, abs=1e-12)
    # the budget 3 x 0.5 minus the clamped 0.6 goes to the other two, equally (equal weights)
    assert ratios["blocks.1.fc"] == pytest.approx(0.45, abs=1e-12)
    assert ratios["blocks.2.fc"] == pytest.approx(0.45, abs=1e-12)
    assert sum(ratios.values()) / 3 == pytest.approx(0.5, abs=1e-12)


def test_camera_loss_weighs_later_refinement_iterations_more():
    from lightning_modules.vggt_spec import camera_loss

    gamma, num = 0.6, 4
    target = torch.zeros(2, 3, 9)
    # iteration k is off by e_k in every translation entry only: its term is l1 = e_k exactly
    errors = [1.0, 10.0, 100.0, 1000.0]
    preds = [target.clone() for _ in range(num)]
    for k, e in enumerate(errors):
        preds[k][..., :3] = e
    expected = sum(gamma ** (num - 1 - k) * e for k, e in enumerate(errors)) / num
    assert camera_loss(preds, target, gamma).item() == pytest.approx(expected, rel=1e-6)
    # one wrong iteration at a time: the last weighs 1, the first gamma^(K-1)
    for k in range(num):
        only = [target.clone() for _ in range(num)]
        only[k][..., :3] = 1.0
        assert camera_loss(only, target, gamma).item() == pytest.approx(gamma ** (num - 1 - k) / num, rel=1e-6)
    # rotation and field of view count too (fov at half weight)
    rot = [target.clone() for _ in range(num)]
    rot[-1][..., 3:7] = 2.0
    rot[-1][..., 7:] = 2.0
    assert camera_loss(rot, target, gamma).item() == pytest.approx((2.0 + 0.5 * 2.0) / num, rel=1e-6)
