import fxqat
from fxqat.modules import QATBottleneckCSP, QATCSPLayer, QATDetectionHead, QATSPPF


def test_blocks_found_with_their_convs_and_grids():
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=10)
    bs = fxqat.blocks(gm)
    kinds = [type(b) for b in bs]
    assert kinds.count(QATCSPLayer) == 8 and kinds.count(QATBottleneckCSP) == 10
    assert kinds.count(QATSPPF) == 1 and kinds.count(QATDetectionHead) == 1
    c2f = next(b for b in bs if isinstance(b, QATCSPLayer) and b.path == "model.4")
    assert set(c2f.convs()) == {"model.4.cv1", "model.4.cv2", "model.4.m.0.cv1", "model.4.m.0.cv2",
                                "model.4.m.1.cv1", "model.4.m.1.cv2"}
    head = fxqat.blocks(gm, "QATDetectionHead")[0]
    assert len(head.convs()) == 18 and len(head.last_convs()) == 6
    head.freeze_bn()
    assert all(m.bn_frozen for m in head.convs().values())
    assert not any(m.bn_frozen for m in c2f.convs().values())
    sppf = fxqat.blocks(gm, "QATSPPF")[0]
    sppf.set_observers(False)
    assert not any(q.observe_enabled for q in sppf.quantizers().values())


def test_block_grids_and_summary_read_the_annotation():
    gm = fxqat.prepare_qat("yolov8n.yaml", nc=10)
    c2f = next(b for b in fxqat.blocks(gm, "QATCSPLayer") if b.path == "model.4")
    # the concat's grid is the one its inputs (cv1's split halves and both bottleneck adds) all use
    assert c2f.concat_grid() is gm.get_submodule("quant.model_4_cv1")
    sppf = fxqat.blocks(gm, "QATSPPF")[0]
    assert sppf.pool_grid() is gm.get_submodule("quant.model_9_cv1")
    adds = [b.add_grid() for b in fxqat.blocks(gm, "QATBottleneckCSP")]
    assert sum(a is not None for a in adds) == 6  # backbone bottlenecks have shortcuts, neck ones do not
    text = sppf.summary()
    assert "sppf.pool" in text and "quant.model_9_cv1" in text and "shared" in text
    assert fxqat.blocks(gm, "QATDetectionHead")[0].grid("detect.box_last") is None  # float output
