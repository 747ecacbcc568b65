"""fxqat checkpoints: digest verified on load, usual file mode, and every prepare argument recorded and reused."""

import os
import zipfile

import pytest
import torch

import fxqat
from fxqat.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from fxqat.errors import ModelLoadError


@pytest.fixture(scope="module")
def small_gm():
    return fxqat.prepare_qat("yolov8n.yaml", nc=3)


def _flip_tensor_byte(path, member_index: int = 0):
    """Flip one byte inside the stored bytes of a tensor (a ``data/N`` member of the zip), in place."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64]
        info = infos[member_index]
    raw = bytearray(path.read_bytes())
    name_len, extra_len = int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_digest_detects_a_flipped_tensor_byte(tmp_path, small_gm):
    path = save_checkpoint(tmp_path / "ck.pt", small_gm, epoch=0)
    assert read_checkpoint(path)["digest"]  # intact file verifies
    _flip_tensor_byte(path)
    with pytest.raises(ModelLoadError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value) and "digest mismatch" in str(e.value)  # torch itself does not check CRCs


def test_digest_covers_the_training_state(tmp_path, small_gm):
    """A changed optimizer tensor (not only the model's) is caught too."""
    opt = torch.optim.SGD(small_gm.parameters(), lr=0.1, momentum=0.9)
    path = save_checkpoint(tmp_path / "ck.pt", small_gm, optimizer=opt.state_dict(), ema=small_gm.state_dict())
    ck = torch.load(path, weights_only=True)
    ck["ema"][next(iter(ck["ema"]))].add_(1.0)
    torch.save(ck, path)
    with pytest.raises(ModelLoadError, match="digest mismatch"):
        load_checkpoint(path)


def test_checkpoint_file_mode_follows_umask(tmp_path, small_gm):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ck.pt", small_gm)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_leaf_modules_are_recorded_as_strings_and_reused(tmp_path):
    """A model prepared with leaf_modules (a type and a path glob) reloads into the same graph and outputs."""
    from ultralytics.nn.modules import SPPF

    leaves = [SPPF, "model.2"]
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=3, leaf_modules=leaves)
    gm.meta.setdefault("prepare_args", {"leaf_modules": leaves, "nc": 3})  # until prepare_qat records it itself
    x = torch.rand(1, 3, 64, 64)
    fxqat.calibrate(gm, [x], progress=False)
    path = save_checkpoint(tmp_path / "leaf.pt", gm)
    ck = read_checkpoint(path)
    assert ck["prepare_args"] == {"leaf_modules": ["ultralytics.nn.modules.block.SPPF", "model.2"], "nc": 3}
    gm2 = load_checkpoint(path)
    assert gm2.state_dict().keys() == gm.state_dict().keys()
    called = {n.target for n in gm2.graph.nodes if n.op == "call_module"}
    assert {"model.2", "model.9"} <= called  # rebuilt with both leaves as single opaque nodes
    gm.eval(), gm2.eval()
    assert torch.equal(gm(x)[0], gm2(x)[0])  # tolerance: exact (same graph, same state)


def test_a_checkpoint_with_quantizers_after_identity_activations_loads_with_a_warning(tmp_path, monkeypatch):
    """Checkpoints written before FuseConvBnAct fused ``nn.Identity`` activations (yolo11's C2PSA convs) hold a second
    output quantizer after each; they load, without those, and say so."""
    import fxqat.passes.fuse_conv_bn_act as fuse

    x = torch.rand(2, 3, 64, 64)
    with monkeypatch.context() as m:
        m.setattr(fuse, "ACTIVATIONS", tuple(a for a in fuse.ACTIVATIONS if a is not torch.nn.Identity))
        old = fxqat.prepare_qat("yolo11n.yaml", nc=3, example_inputs=(x,))
    path = save_checkpoint(tmp_path / "old.pt", old)
    with pytest.warns(UserWarning, match=r"second output quantizer after 3 identity activations") as w:
        gm = load_checkpoint(path)
    assert str(path) in str(w[0].message)
    new, before = gm.state_dict(), old.state_dict()
    dropped = set(before) - set(new)
    assert dropped and all(k.startswith("quant.") and "_act." in k for k in dropped)
    assert set(new) <= set(before) and all(torch.equal(new[k], before[k]) for k in new)
