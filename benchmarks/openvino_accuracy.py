"""OpenVINO INT8 accuracy on CPUs without VNNI: where and why the QDQ model loses accuracy there, and what fixes it.

    python -m benchmarks.openvino_accuracy --data /tmp/signs192/data.yaml [--imgsz 192] [--calib-batches 4]
        [--layer-images 4] [--no-nncf] [--out benchmarks/results/openvino_accuracy.json]

From the shipped ``fxqat-signs-yolov8n`` (PTQ: ``fxqat.prepare_qat`` + ``fxqat.calibrate`` on the train split):

* mAP50-95 / mAP50 on the val split of the fake-quant model, the INT8 torch model, the QDQ model on ONNX Runtime
  (int8 and uint8 weights) and on OpenVINO (the OpenVINO form) with ``overflow_fix`` disable / first_layer / enable,
  the ``openvino_avx2`` preset (7-bit weights) and NNCF's own PTQ of the FP32 model (overflow fix first layer and
  all layers) for reference;
* per layer (``--layer-images`` val images): every activation's codes in OpenVINO against the QDQ reference (ONNX
  Runtime with graph optimizations off: float DQ → op → Q, fake-quant arithmetic) — share of codes off, largest
  difference — beside each conv's predicted share of outputs with an int16 overflow in a ``vpmaddubsw`` kernel
  (u8 × s8 products of adjacent input channels summed in pairs; an estimate: padding read as code 0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")

import fxqat  # noqa: E402
from fxqat.data.images import iter_image_batches, image_files, load_images  # noqa: E402
from fxqat.deploy import export_openvino, openvino_predictor  # noqa: E402
from fxqat.evaluate import evaluate  # noqa: E402
from fxqat.modules.int8 import cpu_has_vnni  # noqa: E402
from fxqat.zoo import load_shipped  # noqa: E402

from .peers import export_fp32_onnx  # noqa: E402

MODEL = "fxqat-signs-yolov8n"
I16 = (-32768, 32767)


# ------------------------------------------------------------------------------------------------ per-layer errors
def _with_activation_outputs(src, dst) -> list[tuple[str, str, float, int]]:
    """A copy of the QDQ model with every activation DequantizeLinear output as a graph output; returns
    ``(output name, producer label, scale, zero point)`` for each."""
    import onnx
    from onnx import helper

    from fxqat.export import constant_values

    m = onnx.load(str(src))
    g = m.graph
    consts = constant_values(g)
    producer = {o: n for n in g.node for o in n.output}
    names = {o.name for o in g.output}
    acts = []
    for n in g.node:
        q = producer.get(n.input[0]) if n.input else None
        if n.op_type != "DequantizeLinear" or q is None or q.op_type != "QuantizeLinear" or n.output[0] in names:
            continue
        src_node = producer.get(q.input[0])
        label = src_node.name if src_node is not None else "input"
        s, z = float(np.ravel(consts[n.input[1]])[0]), int(np.ravel(consts[n.input[2]])[0]) if len(n.input) > 2 else 0
        acts.append((n.output[0], label, s, z))
        g.output.append(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
        names.add(n.output[0])
    onnx.save(m, str(dst))
    return acts


def _conv_inputs(path) -> list[dict]:
    """Each Conv reading DQ(activation) and DQ(int8 weight initializer): its name, input DQ output, weight codes and
    attributes."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type != "Conv":
            continue
        xd, wd = producer.get(n.input[0]), producer.get(n.input[1])
        if xd is None or wd is None or xd.op_type != "DequantizeLinear" or wd.op_type != "DequantizeLinear":
            continue
        w = inits.get(wd.input[0])
        if w is None or w.dtype != np.int8:
            continue
        at = {a.name: list(a.ints) if a.ints else a.i for a in n.attribute}
        out.append({"name": n.name, "x": xd.output[0], "w": w.astype(np.float32), "group": at.get("group", 1),
                    "pads": at.get("pads", [0, 0, 0, 0]), "strides": at.get("strides", [1, 1]),
                    "dilations": at.get("dilations", [1, 1])})
    return out


def overflow_share(codes: np.ndarray, w: np.ndarray, pads, strides, dilations) -> float:
    """Share of conv outputs (N, Cout, positions) where some pair of adjacent input channels' u8 × s8 products, at
    one kernel position, sums beyond int16 (``vpmaddubsw``'s saturation); channels padded to even with zeros."""
    x = torch.from_numpy(codes.astype(np.float32))
    wt = torch.from_numpy(w)
    cout, cin, kh, kw = wt.shape
    cols = torch.nn.functional.unfold(x, (kh, kw), dilation=dilations, padding=pads[:2], stride=strides)
    n, _, npos = cols.shape
    cols = cols.view(n, cin, kh * kw, npos)
    if cin % 2:
        cols = torch.cat([cols, cols.new_zeros(n, 1, kh * kw, npos)], 1)
        wt = torch.cat([wt, wt.new_zeros(cout, 1, kh, kw)], 1)
    pairs = cols.view(n, -1, 2, kh * kw, npos)
    wp = wt.reshape(cout, -1, 2, kh * kw)
    hit = 0
    for o in range(cout):
        s = (pairs * wp[o][None, :, :, :, None]).sum(2)
        hit += int(((s > I16[1]) | (s < I16[0])).any(1).any(1).sum())
    return hit / (n * cout * npos)


def layer_errors(onnx_path, images: torch.Tensor, work: Path) -> list[dict]:
    """OpenVINO against the QDQ reference, per activation; plus each conv's predicted overflow share."""
    import onnxruntime as ort
    import openvino as ov

    aug = work / "aug.onnx"
    acts = _with_activation_outputs(onnx_path, aug)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(aug), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    compiled = ov.Core().compile_model(str(aug), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    refs, gots = [], []
    for x in images.numpy()[:, None]:  # the export has batch 1
        refs.append(dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}))))
        res = compiled(x)
        gots.append({nm: res[port] for port in compiled.outputs for nm in port.get_names()})
    ref = {k: np.concatenate([r[k] for r in refs]) for k in refs[0]}
    got = {k: np.concatenate([r[k] for r in gots]) for k in gots[0]}
    rows = {}
    for name, label, s, _z in acts:
        if name not in got:
            continue
        d = np.abs(got[name] - ref[name]) / s
        rows[name] = {"layer": label, "codes_off": float((d > 0.5).mean()), "max_codes": float(d.max())}
    for c in _conv_inputs(onnx_path):
        if c["group"] != 1 or c["x"] not in ref:
            continue
        act = next(a for a in acts if a[0] == c["x"])
        codes = np.rint(ref[c["x"]] / act[2]) + act[3]
        share = overflow_share(codes, c["w"], c["pads"], c["strides"], c["dilations"])
        rows.setdefault(c["x"], {"layer": act[1], "codes_off": None, "max_codes": None})
        rows[c["x"]].setdefault("consumers", []).append({"conv": c["name"], "overflow_share": share})
    out0 = np.abs(got[names[0]] - ref[names[0]])
    return [{"output0_max_abs": float(out0.max())}] + list(rows.values())


# ----------------------------------------------------------------------------------------------------------- NNCF
def nncf_ptq(fp32_onnx, out_xml, images, overflow_fix: str):
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32_onnx))
    ignored = nncf.IgnoredScope(patterns=[r".*/decode/.*"], types=["Sigmoid"], validate=False)
    adv = nncf.AdvancedQuantizationParameters(overflow_fix=getattr(nncf.OverflowFix, overflow_fix.upper()))
    q = nncf.quantize(model, nncf.Dataset([x[None].numpy() for x in images]), preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=ignored, subset_size=len(images), advanced_parameters=adv)
    ov.save_model(q, str(out_xml), compress_to_fp16=False)
    return out_xml


def _ov_predictor(xml, names, stride):
    from fxqat.deploy import OpenVINORunner
    from fxqat.evaluate import Predictor

    return Predictor(OpenVINORunner(xml), names, stride, "openvino")


# ------------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--imgsz", type=int, default=192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--layer-images", type=int, default=4)
    ap.add_argument("--no-nncf", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/openvino_accuracy.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    fp32 = load_shipped(MODEL)
    names, stride = fp32.names, fp32.stride
    work = Path(tempfile.mkdtemp(prefix="ovacc_"))

    def calibrated(qconfig=None):
        gm = fxqat.prepare_qat(fp32, qconfig)
        fxqat.calibrate(gm, iter_image_batches(a.data, imgsz=a.imgsz, batch=a.batch, split="train"),
                        batches=a.calib_batches, progress=False)
        return gm.eval()

    def ev(model):
        m = evaluate(model, a.data, imgsz=a.imgsz, batch=a.batch, names=names, stride=stride)
        return {"mAP50-95": round(m["mAP50-95"], 4), "mAP50": round(m["mAP50"], 4)}

    rows = {}
    ptq = calibrated()
    rows["fake-quant (default preset, PTQ)"] = ev(ptq)
    print(rows, flush=True)
    rows["INT8 torch"] = ev(fxqat.convert(ptq))
    for w in ("int8", "uint8"):
        p = fxqat.export_onnx(ptq, work / f"ort_{w}.onnx", imgsz=a.imgsz, weights=w)
        rows[f"ONNX Runtime, {w} weights"] = ev(str(p))
    p = fxqat.export_onnx(ptq, work / "ort_int8_fix.onnx", imgsz=a.imgsz, overflow_fix="enable")
    rows["ONNX Runtime, int8 weights, overflow_fix=enable"] = ev(str(p))
    print(rows, flush=True)
    ov_paths = {}
    for fix in ("disable", "first_layer", "enable"):
        p = fxqat.export_onnx(ptq, work / f"ov_{fix}.onnx", imgsz=a.imgsz, requantize_shared=False, overflow_fix=fix)
        ov_paths[fix] = p
        rows[f"OpenVINO, overflow_fix={fix}"] = ev(openvino_predictor(export_openvino(p)))
    print(rows, flush=True)
    # the reference arithmetic of the fixed model: fake-quant with the same 7-bit weights = ORT (uint8 weights)
    p = fxqat.export_onnx(ptq, work / "ort_u8_fix.onnx", imgsz=a.imgsz, weights="uint8", overflow_fix="enable")
    rows["ONNX Runtime, uint8 weights, overflow_fix=enable (the fixed model's exact arithmetic)"] = ev(str(p))
    w7 = calibrated("openvino_avx2")
    rows["fake-quant, openvino_avx2 preset (7-bit weights, PTQ)"] = ev(w7)
    p = fxqat.export_onnx(w7, work / "ov_w7.onnx", imgsz=a.imgsz, requantize_shared=False)
    rows["OpenVINO, openvino_avx2 preset"] = ev(openvino_predictor(export_openvino(p)))
    print(rows, flush=True)
    if not a.no_nncf:
        calib = torch.cat(list(iter_image_batches(a.data, imgsz=a.imgsz, batch=a.batch, split="train")))
        calib = calib[: a.batch * a.calib_batches]
        fp = export_fp32_onnx(fp32, work / "fp32.onnx", a.imgsz)
        rows["OpenVINO FP32"] = ev(_ov_predictor(fp, names, stride))
        for fix in ("first_layer", "enable", "disable"):
            xml = nncf_ptq(fp, work / f"nncf_{fix}.xml", list(calib), fix)
            rows[f"NNCF PTQ (MIXED), overflow_fix={fix}"] = ev(_ov_predictor(xml, names, stride))
        print(rows, flush=True)
    imgs = load_images(image_files(a.data, "val")[: a.layer_images], a.imgsz)
    layers = {fix: layer_errors(ov_paths[fix], imgs, work) for fix in ("disable", "enable")}
    result = {"model": MODEL, "imgsz": a.imgsz, "data": a.data, "vnni": cpu_has_vnni(), "threads": a.threads,
              "calib_images": a.batch * a.calib_batches, "rows": rows, "layers": layers,
              "seconds": round(time.perf_counter() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'form':<86} mAP50-95  mAP50")
    for k, v in rows.items():
        print(f"{k:<86} {v['mAP50-95']:.4f}   {v['mAP50']:.4f}")
    for fix, ls in layers.items():
        print(f"\nOpenVINO, overflow_fix={fix}: output0 max |diff| {ls[0]['output0_max_abs']:.4f}; per activation "
              "(codes off share, max codes; predicted overflow share of the convs reading it):")
        for r in ls[1:]:
            conv = ", ".join(f"{c['overflow_share']:.4f}" for c in r.get("consumers", []))
            off = "n/a" if r["codes_off"] is None else f"{r['codes_off']:.4f} {r['max_codes']:6.1f}"
            print(f"  {r['layer']:<44} {off:<16} {conv}")
    print(f"\n{result['seconds']:.0f} s; {a.out}")


if __name__ == "__main__":
    main()
