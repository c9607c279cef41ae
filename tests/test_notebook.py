"""Notebook support: reproducible set-up, the environment report, check_close, the progress bar switch."""
import pytest
import torch

from moelab.notebook import check_close, environment, progress_bar, setup


def test_setup_fixes_seed_and_threads(monkeypatch):
    monkeypatch.setenv("MOELAB_THREADS", "1")
    setup(seed=3)
    a = torch.rand(3)
    assert torch.get_num_threads() == 1
    setup(seed=3, threads=2)
    assert torch.equal(a, torch.rand(3)) and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="threads = -1 is not allowed"):
        setup(threads=-1)


def test_environment_report_names_torch_and_backends():
    report = environment()
    assert report["torch"] == torch.__version__ and "gloo" in report["distributed backends"]


def test_check_close_passes_and_fails_with_the_place(capsys):
    check_close("same", torch.ones(3), torch.ones(3) + 1e-7)
    assert capsys.readouterr().out == "✓ same: equal within 1e-05\n"
    with pytest.raises(AssertionError, match=r"off: differs at flat index 2: got 5, expected 1"):
        check_close("off", torch.tensor([1.0, 1.0, 5.0]), torch.ones(3))
    with pytest.raises(AssertionError, match=r"shape \(2,\) differs from the expected \(3,\)"):
        check_close("shape", torch.ones(2), torch.ones(3))


def test_progress_bar_obeys_tqdm_disable(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(True, total=3).disable
    monkeypatch.setenv("TQDM_DISABLE", "")
    assert not progress_bar(True, total=3).disable
    assert progress_bar(False, total=3).disable
