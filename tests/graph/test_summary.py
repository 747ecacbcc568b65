import fxqat


def test_summary_table_and_golden(v8n_graph, golden):
    s = fxqat.summary(v8n_graph, imgsz=320)
    assert len(s) == len(v8n_graph.graph.nodes)
    rows = {r.name: r for r in s.rows}
    assert rows["model_0_conv"].shape == "1x16x160x160"
    assert rows["model_0_conv"].block == "Conv" and rows["model_0_conv"].layer == "0"
    assert rows["x"].shape == "1x3x320x320"
    golden("yolov8n_trace_summary.txt", s.to_text())


def test_summary_non_square(v8n_graph):
    rows = {r.name: r for r in fxqat.summary(v8n_graph, imgsz=(384, 640)).rows}
    assert rows["model_0_conv"].shape == "1x16x192x320"
