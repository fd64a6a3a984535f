import pytest
import torch
import torch.nn.functional as F

from vitqc.resampling import resample


@pytest.mark.parametrize(
    ("grid", "size"),
    [
        ((14, 14), (28, 28)),
        ((7, 5), (28, 20)),
        ((5, 6), (13, 9)),
        ((28, 28), (14, 14)),
        ((13, 9), (5, 4)),
    ],
)
def test_resample_is_bilinear_interpolation(grid, size):
    x = torch.randn(3, 4, *grid)
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resample(x, size), expected, rtol=0, atol=1e-5)
    # any leading dimensions: a batch of single-channel maps
    torch.testing.assert_close(resample(x[:, 0], size), expected[:, 0], rtol=0, atol=1e-5)


def test_resample_to_the_same_size_without_blur_is_the_input():
    x = torch.randn(2, 3, 6, 6)
    assert resample(x, (6, 6)) is x


def test_resampled_images_do_not_depend_on_their_batch():
    x = torch.randn(9, 5, 7, 7)
    whole = resample(x, (28, 28), sigma=2.0)
    for i in (0, 4, 8):
        assert torch.equal(resample(x[i : i + 1], (28, 28), sigma=2.0), whole[i : i + 1])
