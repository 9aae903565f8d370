import pytest
import torch

from pipelines.train import metrics

CUDA = torch.device("cuda")


@pytest.mark.parametrize(("device_name", "entry", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.0),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("nvidia h100 pcie", "H100 PCIe", 756.0),
    ("NVIDIA H200", "H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0),
    ("NVIDIA A10G", "A10G", 125.0),
    ("NVIDIA L40S", "L40S", 362.0),
    ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA B200", "B200", 2250.0),
])
def test_gpu_peak_is_looked_up_by_device_name(monkeypatch, device_name, entry, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    peak, source = metrics.peak_tflops(None, CUDA)
    assert peak == tflops
    assert source == f"table:{entry} bf16 dense ({device_name})"


def test_unknown_gpu_falls_back_to_a_measured_probe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(metrics, "probe_cuda_peak_tflops", lambda device: 123.0)
    peak, source = metrics.peak_tflops(None, CUDA)
    assert peak == 123.0
    assert source == "cuda-matmul-probe (Some Future GPU is not in the table)"


def test_configured_peak_wins_and_cpu_uses_its_probe(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: pytest.fail("no device lookup"))
    monkeypatch.setattr(metrics, "probe_peak_tflops", lambda: 0.5)
    assert metrics.peak_tflops(400.0, CUDA) == (400.0, "config")
    assert metrics.peak_tflops(None, torch.device("cpu")) == (0.5, "cpu-matmul-probe")


def test_the_final_loss_line_compares_window_means_not_single_steps():
    from pipelines.train.report import loss_window

    rows = [{"step": step, "loss": 5.0 + (1.0 if step % 2 else -1.0)} for step in range(1, 42)]  # noisy, flat
    rows[5]["loss"] = None  # a skipped step
    first, last = loss_window(rows, first=True), loss_window(rows, first=False)
    assert first == (5.0, 1, 4) and last == (5.0, 38, 41)  # a single step would say 6.0 -> 6.0 or 4.0
    assert loss_window([{"step": 1, "loss": None}], first=True) is None
