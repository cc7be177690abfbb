import torch

from nst_lightning.core.color import combine_luminance, luminance, match_color, match_luminance, rgb_to_yiq, yiq_to_rgb


def test_yiq_roundtrip_and_grey_has_no_chroma():
    image = torch.rand(2, 3, 5, 7)
    torch.testing.assert_close(yiq_to_rgb(rgb_to_yiq(image)), image, atol=1e-5, rtol=1e-5)
    grey = torch.full((1, 3, 2, 2), 0.4)
    yiq = rgb_to_yiq(grey)
    torch.testing.assert_close(yiq[:, 0], torch.full((1, 2, 2), 0.4))
    torch.testing.assert_close(yiq[:, 1:], torch.zeros(1, 2, 2, 2), atol=1e-6, rtol=0)


def test_combine_luminance_keeps_the_chroma_source():
    content = torch.rand(1, 3, 6, 6) * 0.5 + 0.25
    y = torch.rand(1, 1, 6, 6) * 0.2 + 0.4
    combined = rgb_to_yiq(combine_luminance(y, content))
    torch.testing.assert_close(combined[:, :1], y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(combined[:, 1:], rgb_to_yiq(content)[:, 1:], atol=1e-5, rtol=1e-5)


def test_match_luminance_takes_the_content_statistics():
    style_y, content_y = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8) * 0.3 + 0.5
    matched = match_luminance(style_y, content_y)
    assert abs(matched.mean() - content_y.mean()) < 1e-5
    assert abs(matched.std() - content_y.std()) < 1e-5


def test_match_color_gives_the_target_mean_and_covariance():
    torch.manual_seed(0)
    source = torch.rand(1, 3, 16, 16) * 0.4 + 0.1
    target = torch.stack([torch.rand(16, 16) * 0.2 + 0.6, torch.rand(16, 16) * 0.3, torch.rand(16, 16) * 0.4 + 0.3])
    target = target.unsqueeze(0)
    matched = match_color(source, target)

    def stats(x):
        p = x.reshape(3, -1)
        return p.mean(1), torch.cov(p, correction=0)

    for got, want in zip(stats(matched), stats(target), strict=True):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert luminance(matched).shape == (1, 1, 16, 16)
