import pytest

QCONFIG = """\
version: 1
weight: {bits: 8, symmetric: true, per_channel: 0, observer: minmax}
activation: {bits: 8, symmetric: false, observer: moving_average}
rules:
  - match: {name: model_2_cv1}
    activation: {bits: 16, observer: minmax}
  - match: {module: "model.4.*"}
    weight: {bits: 4}
"""
IMGSZ, IMAGES = 64, 2


@pytest.fixture(scope="session")
def explored(tmp_path_factory):
    """yolov8n prepared with a qconfig file, explored at imgsz 64 on 2 generated images:
    (prepared gm, page data, page path, qconfig path)."""
    import fxqat
    from fxqat.explorer import embedded_data

    tmp = tmp_path_factory.mktemp("explore")
    qfile = tmp / "rules.yaml"
    qfile.write_text(QCONFIG)
    gm = fxqat.prepare_qat("yolov8n.yaml", str(qfile), nc=10)
    page = fxqat.explore(gm, out=tmp / "page.html", imgsz=IMGSZ, images=IMAGES, progress=False)
    return gm, embedded_data(page.read_text()), page, qfile


def line_of(text: str, needle: str) -> int:
    return next(k for k, line in enumerate(text.splitlines(), 1) if needle in line)
