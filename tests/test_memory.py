import pytest
import torch

from nst_lightning.errors import ConfigError
from nst_lightning.run.memory import check_fits, estimate_peak, out_of_memory

MIB = 2**20


def estimate_peak_bytes(height: int, width: int, **kwargs) -> int:
    return estimate_peak(height, width, **kwargs).total


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

    from nst_lightning.core.features import FeatureExtractor
    from nst_lightning.run.memory import saved_activations

    layers = ["relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1", "conv3_1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = FeatureExtractor(layers, weights="random")
    with torch.device("meta"):
        shapes = FeatureExtractor(layers, weights=None)
    assert saved_activations(shapes, 40, 56, 4) == saved_activations(real, 40, 56, 4)
    # Mixed precision halves the floating-point activations, not max pooling's int64 indices.
    full, largest, _ = saved_activations(shapes, 40, 56, 4)
    half, _, _ = saved_activations(shapes, 40, 56, 2)
    assert full / 2 < half < full
    # Split after pool2 (tiling.py): the early layers' part and the later layers' part over pool2's map hold
    # exactly the whole pass's tensors between them; the later part's largest (256 channels on a sixteenth of the
    # positions) is a quarter of the whole pass's (64 channels at full resolution).
    early, _, returned = saved_activations(shapes, 40, 56, 4, through="pool2")
    late, late_largest, late_returned = saved_activations(shapes, 40, 56, 4, after="pool2")
    assert set(returned) == {"relu1_1", "relu2_1"} and set(late_returned) == set(layers) - set(returned)
    assert early + late == full and late_largest * 4 == largest


def test_every_tensor_of_the_run_is_counted():
    # Each of these holds memory the content's image size alone does not tell.
    plain = estimate_peak(192, 256, weights="random")
    for kwargs, parts in (
        ({"styles": [(1024, 768)]}, ["target_pass"]),  # a style at its own scale: its forward pass for the targets
        ({"styles": [(256, 192), (256, 192)]}, ["target_pass"]),  # a second style
        ({"masks": 2, "styles": [(256, 192), (256, 192)]}, ["target_pass", "targets", "activations"]),
        ({"previous": (128, 96)}, ["target_pass"]),  # coarse to fine: the previous scale's state meanwhile
        ({"temporal": True}, ["target_pass", "activations"]),  # a video frame: the warped frame, its mask, flows
        ({"preserve_color": "histogram"}, ["target_pass"]),  # the recoloured styles
    ):
        estimate = estimate_peak(192, 256, weights="random", **kwargs)
        assert all(getattr(estimate, part) > getattr(plain, part) for part in parts), kwargs
        assert estimate.total >= plain.total, kwargs
    # A style with 16 times the content's pixels: computing the targets, not the optimisation, is the peak.
    wide = estimate_peak(192, 256, weights="random", styles=[(1024, 768)])
    assert wide.target_pass > wide.largest_phase - 1 and wide.target_pass > 4 * plain.target_pass
    assert wide.optimizer == plain.optimizer and wide.activations == plain.activations
    with pytest.raises(ConfigError, match="the style image is 64x8 px"):
        estimate_peak(192, 256, weights="random", styles=[(64, 8)])


def test_the_forward_pass_without_gradients_holds_a_layers_input_output_and_what_it_returns():
    import torch

    from nst_lightning.core.features import FeatureExtractor
    from nst_lightning.run.activations import forward_peak

    with torch.device("meta"):
        extractor = FeatureExtractor(["relu1_1", "relu2_1"], weights=None)
    peak, returned = forward_peak(extractor, 64, 64)
    relu1_1, relu2_1 = 64 * 64 * 64 * 4, 128 * 32 * 32 * 4
    assert returned == relu1_1 + relu2_1
    # At conv1_2: relu1_1 (kept) and conv1_2's output; then max pooling's output while conv1_2's lives.
    assert peak == 2 * relu1_1 + relu1_1 // 4


def test_a_refusal_for_a_large_style_names_a_style_scale_that_fits(tmp_path):
    # A 1024x16 content with a 32x24 style enlarged to 1024x768: no smaller data.image_size keeps the content
    # 16 px high for relu5_1, so the refusal names the largest data.style_scale that fits, and that one does.
    import re
    import warnings

    from nst_lightning import StyleTransfer, StyleTransferDataModule
    from nst_lightning.run.plan import plan_run
    from tests.conftest import make_image

    thin, style = make_image(tmp_path / "thin.png", 1024, 16), make_image(tmp_path / "style.png", 32, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # No tiles (which would fit it) and the fewest L-BFGS steps: nothing for the plan to give up.
        module = StyleTransfer(weights="random", lbfgs_history_size=5, tile_size=0)
    extractor, settings, free = module.objective.extractor, module.hparams, 512 * MIB

    def check(style_scale: float):
        data = StyleTransferDataModule(str(thin), str(style), image_size=1024, style_scale=style_scale)
        return plan_run(data, [1024], extractor, settings, "32-true", "cpu", available=free)[0]

    assert check_fits(16, 1024, weights="random", available=free, history_size=5)  # the content alone would pass
    with pytest.raises(ConfigError, match=r"^a 1024x16 px run with a 1024x768 px style image needs") as err:
        check(1.0)
    found = re.search(r"try data\.style_scale ([\d.]+), or lower", str(err.value))
    assert found and "data.image_size" not in str(err.value)
    scale = float(found.group(1))
    assert 0 < scale < 1
    check(scale)
    with pytest.raises(ConfigError):
        check(scale + 0.01)


def test_masks_count_in_the_images_prepared():
    from nst_lightning.run.data import input_bytes

    assert input_bytes((100, 50), [(40, 40)], masks=2)[0] > input_bytes((100, 50), [(40, 40)])[0]
    assert input_bytes((100, 50), [(40, 40)], masks=2)[1] == input_bytes((100, 50), [(40, 40)])[1]


@pytest.mark.parametrize(
    "error, asked",
    [
        (RuntimeError("CPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes."), "2048 MiB"),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1048576 bytes."), "1 MiB"),
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)"), "2.00 GiB"),
        (MemoryError(), None),
    ],
)
def test_an_allocation_failure_becomes_one_line_naming_the_headroom(error, asked):
    shortage = out_of_memory(error)
    assert shortage is not None and str(shortage).startswith("out of memory")
    assert "model.tile_size" in str(shortage) and "model.lbfgs_history_size" in str(shortage)
    assert "data.image_size" in str(shortage) and "--" not in str(shortage), "keys: every form (fit, web app) has them"
    assert (f"asked for {asked} more" in str(shortage)) if asked else "asked for" not in str(shortage)


def test_other_errors_are_not_taken_for_a_shortage():
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory(ValueError("out of memory")) is None
