"""The cache of measured layer means: measured once per weights file, read back in later processes, keyed by
the file's identity, and never an error when it is damaged or cannot be written."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import yaml

from nst_lightning.core import features
from nst_lightning.core.features import FeatureExtractor
from nst_lightning.io import cache
from nst_lightning.main import cli_main
from tests.conftest import write_config


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A cache folder of this test's own, and a process that has measured nothing yet (as a new one)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    monkeypatch.setattr(features, "_MEASURED", {})
    return folder


def measured(weights: str) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn
        return FeatureExtractor(["relu2_1"], weights=weights, normalize=True).layer_means


def forbid_measuring(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the means were measured again")

    monkeypatch.setattr(features, "measure_means", fail)


def test_means_are_measured_once_and_read_back_by_a_later_process(fresh, weights_file, monkeypatch):
    first = measured(str(weights_file))
    files = list(fresh.glob("layer_means/*.json"))
    assert len(files) == 1 and files[0].name.startswith("vgg19-")
    monkeypatch.setattr(features, "_MEASURED", {})  # a new process
    forbid_measuring(monkeypatch)
    assert measured(str(weights_file)) == first


def test_another_weights_file_or_a_changed_one_is_measured_again(fresh, weights_file, tmp_path, monkeypatch):
    measured(str(weights_file))
    copy = tmp_path / "copy.pth"
    copy.write_bytes(weights_file.read_bytes())
    measured(str(copy))
    assert len(list(fresh.glob("layer_means/*.json"))) == 2, "another path is another entry"
    stat = os.stat(copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file replaced in place
    monkeypatch.setattr(features, "_MEASURED", {})
    measured(str(copy))
    assert len(list(fresh.glob("layer_means/*.json"))) == 3


@pytest.mark.slow
@pytest.mark.parametrize("damage", [b"", b"{not json", b'{"key": 1, "means": {}}', b'{"key": {}, "means": []}'])
def test_a_damaged_cache_file_is_measured_again_and_rewritten(fresh, weights_file, monkeypatch, damage):
    first = measured(str(weights_file))
    (path,) = fresh.glob("layer_means/*.json")
    path.write_bytes(damage)
    monkeypatch.setattr(features, "_MEASURED", {})
    assert measured(str(weights_file)) == first
    stored = cache.load_means(json.loads(path.read_text())["key"])
    assert stored and {name: stored[name] for name in first} == first, "written again, whole"


def test_a_cache_entry_for_another_network_is_not_taken(fresh, weights_file, monkeypatch):
    first = measured(str(weights_file))
    (path,) = fresh.glob("layer_means/*.json")
    stored = json.loads(path.read_text())
    stored["key"]["pooling"] = "avg"  # a file whose name does not match what it holds
    stored["means"] = {name: value * 2 for name, value in first.items()}
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(features, "_MEASURED", {})
    assert measured(str(weights_file)) == first


def test_a_cache_folder_that_cannot_be_written_is_no_error(tmp_path, weights_file, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "cache"))
    monkeypatch.setattr(features, "_MEASURED", {})
    assert measured(str(weights_file))


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "nst-lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "nst-lightning"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "moved"))
    assert cache.cache_dir() == tmp_path / "moved"


def test_a_run_from_cached_means_still_records_them_in_its_config(fresh, tmp_path, images, weights_file, monkeypatch):
    config = write_config(tmp_path, images, model={"weights": str(weights_file)}, trainer={"max_steps": 1})
    cli_main(["fit", "--config", str(config)])
    monkeypatch.setattr(features, "_MEASURED", {})
    forbid_measuring(monkeypatch)
    cli_main(["fit", "--config", str(config), "--output.overwrite", "true"])
    runs = sorted((tmp_path / "runs" / "lightning_logs").glob("version_*/config.yaml"))
    assert len(runs) == 2
    recorded = [yaml.safe_load(path.read_text())["model"]["layer_means"] for path in runs]
    assert recorded[0] == recorded[1] and recorded[1], "the means used are in the saved config"
