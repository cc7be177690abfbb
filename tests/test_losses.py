import pytest
import torch

from nst_lightning.core.losses import (
    content_loss,
    gram_matrix,
    mean_covariance,
    sqrtm_psd,
    style_loss,
    total_variation,
    wasserstein2_gaussian,
)


def test_gram_matrix_by_hand():
    # Two channels of two pixels: F = [[1, 2], [3, 4]], F F^T = [[5, 11], [11, 25]], over C*H*W = 4.
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    expected = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 4
    torch.testing.assert_close(gram_matrix(features), expected.unsqueeze(0))


def test_gram_matrix_is_batched_and_symmetric():
    features = torch.randn(3, 4, 5, 6)
    gram = gram_matrix(features)
    assert gram.shape == (3, 4, 4)
    torch.testing.assert_close(gram, gram.transpose(1, 2))
    torch.testing.assert_close(gram[1], gram_matrix(features[1:2])[0])


def test_gram_matrix_rejects_wrong_rank():
    with pytest.raises(ValueError, match="4-D"):
        gram_matrix(torch.randn(4, 5, 6))


def test_losses_stay_float32_under_autocast():
    features = torch.randn(1, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = features.to(torch.bfloat16)
        assert gram_matrix(half).dtype == torch.float32
        assert content_loss(half, features).dtype == torch.float32
        assert style_loss(gram_matrix(half), gram_matrix(features)).dtype == torch.float32
        assert total_variation(half).dtype == torch.float32


def test_content_loss_is_mean_squared_error():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 1.0, 0.0, 3.0]).view(1, 1, 2, 2)
    assert content_loss(a, b).item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_style_loss_is_zero_for_equal_grams_and_positive_otherwise():
    x = torch.randn(1, 3, 4, 4)
    assert style_loss(gram_matrix(x), gram_matrix(x)).item() == 0.0
    assert style_loss(gram_matrix(x), gram_matrix(2 * x)).item() > 0.0


def test_total_variation_by_hand():
    # [[0, 1], [2, 3]]: vertical |2-0| + |3-1| = 4, horizontal |1-0| + |3-2| = 2; over C*H*W = 4.
    image = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    assert total_variation(image).item() == pytest.approx(6 / 4)


def test_total_variation_is_zero_for_flat_image_and_grows_with_noise():
    flat = torch.full((1, 3, 8, 8), 0.5)
    assert total_variation(flat).item() == 0.0
    noisy = flat + 0.1 * torch.randn(1, 3, 8, 8)
    assert total_variation(noisy).item() > total_variation(flat + 0.01 * torch.randn(1, 3, 8, 8)).item()


def test_masked_gram_matrix_is_the_gram_of_the_region():
    features = torch.randn(1, 3, 4, 6)
    mask = torch.zeros(1, 1, 4, 6)
    mask[..., :, :2] = 1
    torch.testing.assert_close(gram_matrix(features, mask), gram_matrix(features[..., :, :2].contiguous()))
    torch.testing.assert_close(gram_matrix(features, torch.ones(1, 1, 4, 6)), gram_matrix(features))


def test_mean_covariance_by_hand():
    features = torch.tensor([[1.0, 3.0], [2.0, 2.0]]).view(1, 2, 1, 2)
    mean, cov = mean_covariance(features, eps=0.0)
    torch.testing.assert_close(mean, torch.tensor([[2.0, 2.0]]))
    torch.testing.assert_close(cov, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


def test_sqrtm_psd_squares_back():
    a = torch.randn(5, 5)
    spd = a @ a.T + 0.1 * torch.eye(5)
    root = sqrtm_psd(spd)
    torch.testing.assert_close(root @ root, spd, atol=1e-4, rtol=1e-4)


def test_wasserstein2_matches_the_closed_form_for_diagonal_gaussians():
    # For diagonal covariances W2^2 = |m1 - m2|^2 + sum (s1 - s2)^2 over channels; divided by C.
    m1, m2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    s1, s2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 2.0])
    c1, c2 = torch.diag(s1**2).unsqueeze(0), torch.diag(s2**2).unsqueeze(0)
    w2 = wasserstein2_gaussian(m1, c1, m2, c2, sqrtm_psd(c2))
    assert w2.item() == pytest.approx((1.0 + 4.0) / 2, abs=1e-4)
    assert wasserstein2_gaussian(m2, c2, m2, c2, sqrtm_psd(c2)).item() == pytest.approx(0.0, abs=1e-4)


def test_wasserstein2_of_a_gaussian_with_itself_is_zero_not_negative():
    # Caffe-scale activations: tr(S) + tr(S) - 2 tr(sqrt(S^1/2 S S^1/2)) loses float32 digits.
    torch.manual_seed(0)
    mean, cov = mean_covariance(torch.rand(1, 256, 16, 16) * 300)
    assert float(wasserstein2_gaussian(mean, cov, mean, cov, sqrtm_psd(cov))) == 0.0


def test_wasserstein2_has_finite_gradients():
    features = torch.randn(1, 4, 6, 6, requires_grad=True)
    target_mean, target_cov = mean_covariance(torch.randn(1, 4, 6, 6))
    mean, cov = mean_covariance(features)
    wasserstein2_gaussian(mean, cov, target_mean, target_cov, sqrtm_psd(target_cov)).backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


@pytest.mark.parametrize("batch", [1, 2])  # one channels-last image takes the 1x1-convolution path
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_gradient_is_autograds_in_either_layout(layout, batch):
    # The Gram backward is one product, written in the input's layout; it must equal autograd's.
    features = torch.randn(batch, 5, 3, 4).contiguous(memory_format=layout).requires_grad_(True)
    weights = torch.randn(batch, 5, 5)
    (gram_matrix(features) * weights).sum().backward()
    flat = features.detach().reshape(batch, 5, 12).requires_grad_(True)
    (torch.bmm(flat, flat.transpose(1, 2)).div(60) * weights).sum().backward()
    torch.testing.assert_close(features.grad.reshape(batch, 5, 12), flat.grad)
    assert features.grad.is_contiguous(memory_format=layout)


def test_gram_gradient_of_one_channels_last_image_is_a_1x1_convolution():
    # The fast path (see _Gram): the gradient product runs as a convolution, not as bmm.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    features = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    gram = gram_matrix(features)
    with Ops() as ops:
        gram.sum().backward()
    assert "convolution.default" in ops.names and "bmm.default" not in ops.names
    assert features.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gram_of_bfloat16_features_is_float32_and_its_gradient_bfloat16(layout, batch):
    features = torch.rand(batch, 8, 6, 7).to(torch.bfloat16).contiguous(memory_format=layout)
    target = torch.rand(batch, 8, 8) * 0.3
    ours = features.clone().requires_grad_()
    gram = gram_matrix(ours)
    # The backward pass keeps the bfloat16 activations, not a float32 copy of them.
    assert [t.dtype for t in gram.grad_fn.saved_tensors] == [torch.bfloat16]
    style_loss(gram, target).backward()
    wide = features.double().requires_grad_()  # the exact reference: the same values, widened
    expected = wide.flatten(2) @ wide.flatten(2).transpose(1, 2) / (8 * 6 * 7)
    ((expected - target.double()) ** 2).mean().backward()
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram.double(), expected.detach(), rtol=1e-6, atol=1e-7)  # widened, not rounded
    assert ours.grad.dtype == torch.bfloat16 and ours.grad.shape == features.shape
    error = (ours.grad.double() - wide.grad).norm() / wide.grad.norm()
    assert error < 1e-2  # bfloat16 rounding (~0.2%), not a wrong gradient
