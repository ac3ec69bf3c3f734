"""--cuda-graphs: the captured step replays what the eager step computes."""
import pytest
import torch

from gan_fast import backends
from gan_fast.config import TrainConfig
from gan_fast.train import Trainer

from .conftest import TINY, run_module


def test_cuda_graphs_on_without_cuda_is_a_clear_error(tmp_path):
    r = run_module("gan_fast.train", *TINY, "--steps", "1", "--device", "cpu", "--cuda-graphs", "on",
                   "--out", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--cuda-graphs on: CUDA graphs need a CUDA device" in r.stderr


def test_auto_stays_eager_on_cpu(tmp_path):
    cfg = TrainConfig(image_size=16, nz=8, ngf=4, ndf=4, batch_size=8, steps=2, device="cpu",
                      out=str(tmp_path), workers=0)
    assert not Trainer(cfg, log=lambda *a: None).use_cuda_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["reference", "triton", "ext"])
def test_graphed_steps_match_eager_steps(backend, tmp_path):
    reason = backends.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)

    def losses(graphs):
        cfg = TrainConfig(image_size=32, nz=16, ngf=8, ndf=8, batch_size=16, steps=6, device="cuda",
                          backend=backend, cuda_graphs=graphs, out=str(tmp_path / graphs), workers=0)
        trainer = Trainer(cfg, log=lambda *a: None)
        assert trainer.use_cuda_graphs == (graphs == "on")
        from gan_fast.cuda_graphs import GraphedStep
        step = GraphedStep(trainer) if graphs == "on" else trainer.train_step
        torch.manual_seed(0)
        batches = trainer.data.batches(cfg.batch_size, 0, 0)
        return torch.stack([step(next(batches)) for _ in range(6)]).cpu()

    eager, graphed = losses("off"), losses("on")
    # the noise comes from the same CUDA generator in both; capture changes no arithmetic
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-4)
