import socket

import torch

from fxqat.distributed import run_ddp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_end_identical(tmp_path):
    folder = run_ddp(world=2, steps=3, out=str(tmp_path), port=_free_port())
    a, b = (torch.load(folder / f"rank{i}.pt") for i in range(2))
    assert a.keys() == b.keys()
    scales = [k for k in a if k.endswith(".scale")]
    assert len(scales) > 100  # 50 activation + 63 weight quantizers
    for k in a:
        assert torch.equal(a[k], b[k]), k  # tolerance: exact — DDP averages gradients, ranges are all-reduced
    # training moved the weights away from the shared initialization (same seed as the ranks used)
    from fxqat.models import load_model

    torch.manual_seed(0)
    init = load_model("yolov8n.yaml", nc=10).state_dict()["model.0.conv.weight"]
    assert not torch.equal(init, a["model.0.conv.weight"])
