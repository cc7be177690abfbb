import torch

from nst_lightning.runtime import physical_cores, set_default_threads


def test_physical_cores_is_a_positive_count():
    assert 1 <= physical_cores() <= (torch.get_num_threads() + 1024)


def test_threads_default_to_physical_cores_unless_the_user_set_them(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert set_default_threads() == physical_cores() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(before)
        assert set_default_threads() is None
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
