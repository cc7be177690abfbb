import pytest

from nst_lightning.errors import ConfigError
from nst_lightning.memory import check_fits, estimate_peak, estimate_peak_bytes

MIB = 2**20


def test_estimate_grows_with_size_history_and_depth():
    sizes = [estimate_peak_bytes(s * 3 // 4, s, weights="random") for s in (256, 512, 1024, 2048)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    # Small runs: loading the ImageNet file (before the run) is the peak.
    assert estimate_peak_bytes(96, 128) == estimate_peak_bytes(192, 256)
    histories = [estimate_peak_bytes(384, 512, weights="random", history_size=h) for h in (1, 10, 100)]
    assert histories == sorted(histories) and len(set(histories)) == 3
    default = estimate_peak_bytes(384, 512, weights="random")
    shallow = estimate_peak_bytes(384, 512, weights="random", content_layers=["conv2_1"], style_layers=["conv1_1"])
    assert shallow < default
    assert estimate_peak_bytes(384, 512, weights="random", optimizer="adam") < default
    assert estimate_peak_bytes(384, 512, weights="random", precision="bf16-mixed") < default


def test_estimate_magnitudes():
    est = estimate_peak(384, 512, weights="random")
    pixels = 3 * 384 * 512
    # L-BFGS: 2 * 50 history vectors (the default) and a few more, float32.
    assert 100 * pixels * 4 <= est.optimizer <= 110 * pixels * 4
    # Truncated VGG-19 (through conv5_1): about 12.9 M parameters.
    assert 45 * MIB < est.weights < 55 * MIB
    # Saved activations at 512x384: a few hundred MiB; the whole run on a CPU: 1-2 GiB.
    assert 200 * MIB < est.activations < 600 * MIB
    assert 1024 * MIB < est.total < 2048 * MIB
    # Activations scale with the pixels: four times the area, about four times the memory.
    assert 3.5 < estimate_peak(768, 1024).activations / est.activations < 4.5
    # On a GPU the process's own footprint is not device memory.
    assert estimate_peak(384, 512, device="cuda").runtime == 0
    # ImageNet weights are read whole before the run: their file counts while loading.
    assert estimate_peak(384, 512, weights="imagenet").weights_loading > est.weights_loading


def test_check_fits_refuses_with_a_smaller_size():
    need = estimate_peak(768, 1024, weights="random")
    assert check_fits(768, 1024, weights="random", available=10 * need.total) == need
    with pytest.raises(ConfigError, match=r"1024x768 px run needs about .* try data.image_size (\d+)") as err:
        check_fits(768, 1024, weights="random", available=need.total // 3)
    suggested = int(str(err.value).split("data.image_size ")[1].split(",")[0])
    assert 0 < suggested < 1024
    h, w = suggested * 3 // 4, suggested
    smaller = estimate_peak(h, w, weights="random")
    assert smaller.total - smaller.runtime <= need.total // 3
    with pytest.raises(ConfigError, match="no image size fits"):
        check_fits(768, 1024, weights="random", available=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        estimate_peak(0, 10)
    with pytest.raises(ConfigError, match="unknown"):
        estimate_peak(64, 64, content_layers=["conv9_9"])
    with pytest.raises(ConfigError, match="too small for layer relu5_1"):
        estimate_peak(12, 64)
    estimate_peak(12, 64, content_layers=["conv2_1"], style_layers=["conv1_1"])


def test_the_activations_are_those_of_the_real_extractor():
    # The estimate passes the extractor that a run builds over the image on the meta device: the same
    # extractor with weights, on a CPU, keeps exactly as many bytes for its backward pass.
    import warnings

    import torch

    from nst_lightning.features import FeatureExtractor
    from nst_lightning.memory import saved_activations

    layers = ["relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "conv3_1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = FeatureExtractor(layers, weights="random")
    with torch.device("meta"):
        shapes = FeatureExtractor(layers, weights=None)
    assert saved_activations(shapes, 40, 56, 4) == saved_activations(real, 40, 56, 4)
    # Mixed precision halves the floating-point activations, not max pooling's int64 indices.
    full, _ = saved_activations(shapes, 40, 56, 4)
    half, _ = saved_activations(shapes, 40, 56, 2)
    assert full / 2 < half < full
