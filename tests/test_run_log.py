"""gan_fast.run_log: metrics.jsonl and its plot."""
import os

from PIL import Image

from gan_fast.run_log import MetricsLog


def test_plot_with_eval_rows_only_from_resume(tmp_path):
    log = MetricsLog(str(tmp_path / "m.jsonl"), resume_step=0)
    log.write({"step": 5, "loss_d": 1.0, "loss_g": 2.0, "d_x": 0.5, "d_g_z1": 0.4, "d_g_z2": 0.3})
    log.write({"step": 5, "digits_fd": 100.0, "digits_coverage": 0.9, "digits_confidence": 0.8})
    log.plot(str(tmp_path / "loss.png"))
    assert Image.open(tmp_path / "loss.png").format == "PNG"
    assert sorted(os.listdir(tmp_path)) == ["loss.png", "m.jsonl"]  # no temporary file left


def test_resume_drops_rows_past_the_checkpoint(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path, resume_step=0)
    for step in (1, 2, 3):
        log.write({"step": step, "loss_d": 1.0})
    with open(path, "a") as f:
        f.write('{"step": 4, "loss_d"')  # a row cut by a kill
    assert [r["step"] for r in MetricsLog(path, resume_step=2).rows] == [1, 2]
    with open(path) as f:
        assert [line.count("step") for line in f] == [1, 1]
