"""Helpers shared by tests (imported explicitly)."""

import torch


@torch.no_grad()
def liven(model, seed: int = 0):
    """Give a freshly built model non-degenerate BatchNorm statistics so activations vary like a trained net's."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def signs_like_images(n: int, size: int = 320, seed: int = 0) -> torch.Tensor:
    """Random images with sign-like blobs: colored discs and squares on a textured background, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(n, 3, size, size, generator=g) * 0.3 + 0.35
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(4):
            cx, cy = torch.randint(20, size - 20, (2,), generator=g).tolist()
            r = int(torch.randint(8, 40, (1,), generator=g))
            color = torch.rand(3, 1, generator=g)
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
            imgs[i][:, mask] = color
    return imgs.clamp(0, 1)


def assert_bit_exact(eager, graph, x):
    """Eager Ultralytics and the traced graph give the same outputs, bit for bit (tolerance: exact)."""
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        a, b = eager(x), graph(x)
    fa, sa = tree_flatten(a)
    fb, sb = tree_flatten(b)
    assert sa == sb, f"output structure differs: {sa} vs {sb}"
    for p, q in zip(fa, fb):
        assert torch.equal(p, q), "traced graph output is not bit-identical to eager"


def assert_traced_matches_in_both_modes(model, gm, sizes):
    """Train and eval mode, each input size: :func:`assert_bit_exact` on one seeded random image."""
    for mode in ("train", "eval"):
        model.train(mode == "train")
        gm.train(mode == "train")
        for h, w in sizes:
            torch.manual_seed(0)
            assert_bit_exact(model, gm, torch.rand(1, 3, h, w))


def assert_int8_matches_fake_quant(gm, q, x):
    """The converted INT8 model ``q`` gives what the fake-quant model ``gm`` (eval) gives on ``x``, Detect output
    (B, 4 + nc, A). Tolerance: rounding ties may flip one code in an intermediate layer; class scores within one
    uint8 step of a [0, 1] score for >= 99.9 %, boxes within 1 px for >= 99.9 %."""
    with torch.no_grad():
        ref, out = gm(x)[0], q(x)
    assert out.shape == ref.shape
    assert ((ref[:, 4:] - out[:, 4:]).abs() <= 1 / 255).float().mean() >= 0.999
    assert ((ref[:, :4] - out[:, :4]).abs() <= 1.0).float().mean() >= 0.999
    return ref, out


def prepared_and_calibrated(name: str, nc: int, end2end: bool = False):
    """A livened model (seed 0) prepared with the default qconfig and calibrated on two 320 px batches:
    (QAT graph in eval mode, its prepared summary text for the golden files)."""
    import fxqat
    from fxqat.models import load_model

    torch.manual_seed(0)  # the model's initial weights
    model = liven(load_model(name, nc=nc))
    if end2end:
        model.end2end = True
    gm = fxqat.prepare_qat(model)
    text = fxqat.summary(gm, imgsz=320).to_text()
    fxqat.calibrate(gm, [signs_like_images(2, 320, seed=s) for s in range(2)], progress=False)
    return gm.eval(), text


def interrupted_after_first_epoch(real):
    """A ``fxqat.training._trainer_cls`` stand-in whose trainer raises KeyboardInterrupt once epoch 1 is saved."""
    def trainer_cls(task="detect"):
        class Interrupted(real(task)):
            def save_model(self):
                out = super().save_model()
                if self.epoch == 0:
                    raise KeyboardInterrupt("Ctrl-C after epoch 1 of 2")
                return out

        return Interrupted

    return trainer_cls
