"""The run's plots say what they show: titles, and a memory axis that names the memory and starts at 0."""
import torch

from vidtune.train.log import memory_kind, plot_figures


def test_titles_and_memory_axis():
    rows = [{"step": s, "loss": float.hex(1.0 / s), "lr": 1e-4, "grad_norm": 0.5, "skipped": False,
             "mem": (600 + s) * 2**20, "mem_of": memory_kind(torch.device("cpu"))} for s in range(1, 31)]
    figs = plot_figures(rows, "run7")
    assert set(figs) == {"loss", "lr", "grad_norm", "memory"}
    titles = {n: f.axes[0].get_title() for n, f in figs.items()}
    assert titles["loss"] == "run7: training loss" and titles["grad_norm"].startswith("run7: gradient norm")
    mem = figs["memory"].axes[0]
    assert mem.get_title() == "run7: host memory: process RSS" and mem.get_ylabel() == "host memory (GiB)"
    lo, hi = mem.get_ylim()
    assert lo == 0 and hi < 1  # a 30 MiB change on ~0.6 GiB stays small, not the full axis
    assert memory_kind(torch.device("cuda")) == "device memory: peak allocated by torch"
