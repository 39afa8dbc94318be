"""Figures, statistics and the ``deformable analyze`` command."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from deformable.analysis import FigureNode, add_cli, plot_support_figure, size_category, support_statistics
from deformable.models import resnet18_dcn

from .helpers import randomise_offsets, stack

image_io = pytest.importorskip("matplotlib.image")


def _non_blank(path) -> bool:
    pixels = image_io.imread(str(path))
    return pixels.ndim == 3 and float(pixels[..., :3].std()) > 0.02


def test_support_figure_for_regular_dcnv1_dcnv2(tmp_path):
    models = {
        "regular": stack("regular"),
        "DCNv1": randomise_offsets(stack("v1")),
        "DCNv2": randomise_offsets(stack("v2")),
    }
    image = torch.rand(3, 12, 12, dtype=torch.float64)
    nodes = [FigureNode("object", "4", (3, 3)), FigureNode("background", "4", (0, 5), channel=1)]
    out = plot_support_figure(
        models, image, nodes, tmp_path / "figs" / "figure1.png", block_size=3, title="t"
    )
    assert out.is_file() and _non_blank(out)


def test_roi_figure_on_a_detector(tmp_path, detector):
    image = torch.rand(3, 64, 64)
    nodes = [FigureNode("RoI", "roi", (10, 12, 40, 50))]
    out = plot_support_figure({"DCNv2": detector}, image, nodes, tmp_path / "figure2.png", saliency=False)
    assert out.is_file() and _non_blank(out)


def test_support_statistics_by_object_size_and_background():
    model = stack("v1")
    image = torch.rand(3, 16, 16, dtype=torch.float64)
    samples = [(image, torch.tensor([[2.0, 2.0, 7.0, 7.0]])), (image.flip(-1), torch.zeros(0, 4))]
    stats = support_statistics(model, samples, "4", block_size=8, generator=torch.Generator().manual_seed(0))
    summary = stats.summary()
    assert summary["small"]["nodes"] == 1 and summary["background"]["nodes"] == 2
    assert math.isnan(summary["large"]["erf_spread"])
    assert (
        0 < summary["small"]["erf_spread"] < 16 and 0 <= summary["background"]["saliency_area_fraction"] <= 1
    )
    dilation = stats.effective_dilation()
    assert list(dilation) == ["2", "4"]
    assert dilation["2"]["background"] == pytest.approx(2.0) and dilation["4"]["small"] == pytest.approx(1.0)
    assert "| small | 1 |" in stats.to_markdown()
    assert [size_category(a) for a in (10, 32**2, 96**2)] == ["small", "medium", "large"]
    for kwargs, error, words in (
        (dict(dilation_layers="bogus"), ValueError, "layers must be"),  # was swallowed: no dilation
        (dict(backgrounds_per_image=-1), ValueError, "backgrounds_per_image"),
        (dict(backgrounds_per_image=1.5), TypeError, "backgrounds_per_image"),
    ):
        with pytest.raises(error, match=words):
            support_statistics(model, samples, "4", saliency=False, **kwargs)


@pytest.mark.parametrize(
    "sample, error, words",
    [
        ((torch.rand(3, 8, 8),), TypeError, r"samples\[0\] must be \(image, boxes\)"),
        (torch.rand(3, 8, 8), TypeError, r"samples\[0\] must be \(image, boxes\)"),
        ((torch.rand(3, 8, 8), [1.0, 2.0, 3.0]), ValueError, r"samples\[0\] boxes must have shape \[M, 4\]"),
        ((torch.rand(3, 8, 8), "box"), TypeError, r"samples\[0\] boxes must be \[M, 4\] numbers"),
        ((torch.rand(3, 8, 8), [[math.nan, 0, 4, 4]]), ValueError, r"samples\[0\] boxes must be finite"),
        ((torch.rand(3, 8, 8), [[0, 0, 4, 4]], [1, 2]), ValueError, r"samples\[0\] labels"),
    ],
)
def test_support_statistics_checks_its_samples(sample, error, words):
    # Used to fail with IndexError, a reshape RuntimeError, "cannot convert float NaN" or zip's message.
    with pytest.raises(error, match=words):
        support_statistics(stack(dtype=torch.float32), [sample], "4", saliency=False, dilation=False)


def test_support_statistics_arguments_are_checked():
    model, image = stack(dtype=torch.float32), torch.rand(3, 8, 8)
    with pytest.raises(TypeError, match="samples must be an iterable"):
        support_statistics(model, None, "4")
    with pytest.raises(TypeError, match="generator"):
        support_statistics(model, [(image, [[0, 0, 4, 4]])], "4", saliency=False, generator=3)
    with pytest.raises(TypeError, match="layer must be a module name"):
        support_statistics(model, [(image, [[0, 0, 4, 4]])], None, saliency=False, dilation=False)
    with pytest.raises(TypeError, match="area"):
        size_category("large")


def test_support_figure_arguments_are_checked(tmp_path):
    model, image, out = stack(), torch.rand(3, 8, 8, dtype=torch.float64), tmp_path / "f.png"
    nodes = [FigureNode("a", "4", (1, 1))]
    cases = [
        (dict(models=3), TypeError, "models must be a mapping"),
        (dict(models=[model]), TypeError, r"models\[0\] must be a \(label, model\) pair"),
        (dict(nodes=[("a", "4", (1, 1))]), TypeError, "nodes must be a list of FigureNode"),
        (dict(nodes=nodes[0]), TypeError, "nodes must be a list of FigureNode"),
        (dict(image=None), TypeError, "image must be a torch.Tensor"),
        (dict(display_image="x"), TypeError, "display_image"),
        (dict(display_image=torch.rand(8, 8)), ValueError, "display_image"),
        (dict(display_image=torch.rand(3, 4, 4)), ValueError, "display_image"),
    ]
    for kwargs, error, words in cases:
        arguments = dict(models={"m": model}, image=image, nodes=nodes, out=out, saliency=False) | kwargs
        with pytest.raises(error, match=words):
            plot_support_figure(**arguments)
    assert not out.exists()


def test_analyze_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="deformable")
    add_cli(parser.add_subparsers(dest="command", required=True))
    paths = []
    for dcn in (None, "v2"):
        torch.manual_seed(0)
        path = tmp_path / f"{dcn or 'regular'}.pth"
        torch.save(resnet18_dcn(dcn=dcn, dcn_stages=(5,), num_classes=4).state_dict(), path)
        paths.append(str(path))
    image_io.imsave(str(tmp_path / "image.png"), torch.rand(32, 32, 3).numpy())
    out = tmp_path / "analysis.png"
    args = parser.parse_args(
        ["analyze", "--model", "resnet18_dcn", "--num-classes", "4", "--checkpoint", *paths,
         "--dcn", "none", "v2", "--dcn-stages", "5", "--labels", "regular", "DCNv2",
         "--image", str(tmp_path / "image.png"), "--out", str(out), "--layer", "layer4",
         "--fg", "16", "16", "--no-saliency"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert out.is_file() and _non_blank(out)
    assert "wrote" in capsys.readouterr().out
    bad = parser.parse_args(["analyze", "--model", "resnet18_dcn", "--checkpoint", *paths, "--dcn", "none",
                             "v1", "v2", "--image", "x.png", "--out", "y.png"])  # fmt: skip
    with pytest.raises(SystemExit):
        bad.func(bad)


def test_analyze_builds_trained_runs_from_their_config_and_refuses_partial_fits(tmp_path, capsys):
    """A `deformable train` file carries its config (no model options needed); a plain state dict that
    fits the named model only partly is an error unless --allow-partial."""
    from deformable.engine.classifier import build_classifier
    from deformable.engine.config import load_any_config

    parser = argparse.ArgumentParser(prog="deformable")
    add_cli(parser.add_subparsers(dest="command", required=True))
    image_io.imsave(str(tmp_path / "image.png"), torch.rand(32, 32, 3).numpy())
    common = ["--image", str(tmp_path / "image.png"), "--fg", "16", "16", "--no-saliency"]

    cfg = load_any_config(
        None, ["task=classification", "dataset=deformed_fashion", "arch=resnet18", "dcn=v2", "dcn_stages=[5]"]
    )
    torch.manual_seed(0)
    trained = build_classifier(cfg, 4)
    run_file = tmp_path / "model_final.pth"
    torch.save({"model": trained.state_dict(), "config": cfg.to_dict()}, run_file)
    out = tmp_path / "a.png"
    args = parser.parse_args(["analyze", "--checkpoint", str(run_file), "--out", str(out), *common])
    assert args.func(args) == 0 and _non_blank(out)

    plain = tmp_path / "regular.pth"
    torch.save(resnet18_dcn(dcn=None, dcn_stages=(5,), num_classes=4).state_dict(), plain)
    options = ["--model", "resnet18_dcn", "--num-classes", "4", "--dcn", "v2", "--dcn-stages", "5"]
    args = parser.parse_args(
        ["analyze", *options, "--checkpoint", str(plain), "--out", str(tmp_path / "b.png"), *common]
    )
    with pytest.raises(SystemExit, match=r"missing.*--allow-partial"):
        args.func(args)
    args = parser.parse_args(
        ["analyze", *options, "--allow-partial", "--checkpoint", str(plain), "--out", str(tmp_path / "b.png"),
         *common]
    )  # fmt: skip
    assert args.func(args) == 0
    assert "missing" in capsys.readouterr().out
    no_model = parser.parse_args(["analyze", "--checkpoint", str(plain), "--out", "c.png", *common])
    with pytest.raises(SystemExit, match="--model"):
        no_model.func(no_model)
    # Options the builders refuse were tracebacks.
    detector = ["--model", "fasterrcnn_resnet50_fpn_dcn", "--num-classes", "3", "--backbone", "resnet999"]
    cases = (
        (detector, "fasterrcnn_resnet50_fpn_dcn: .*backbone"),
        ([*options, "--dcn-stages", "7"], "resnet18_dcn: .*dcn_stages"),
    )
    for model_options, words in cases:
        argv = ["analyze", *model_options, "--checkpoint", str(plain), "--out", "e.png", *common]
        bad_option = parser.parse_args(argv)
        with pytest.raises(SystemExit, match=f"--model {words}"):
            bad_option.func(bad_option)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path, message in ((tmp_path / "absent.pth", "not found"), (garbage, "not a readable checkpoint")):
        bad = parser.parse_args(["analyze", "--checkpoint", str(path), "--out", "d.png", *common])
        with pytest.raises(SystemExit, match=message):
            bad.func(bad)


def _analyze_parser():
    parser = argparse.ArgumentParser(prog="deformable")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_analyze_title_names_the_configured_architecture_and_errors_are_messages(tmp_path, monkeypatch):
    # Checkpoints carrying their config used to be titled "None: layer4" (the unset --model); a bad
    # --layer (any ValueError of the analysis) was a traceback.
    from deformable.analysis import plotting
    from deformable.engine.classifier import build_classifier
    from deformable.engine.config import load_any_config

    cfg = load_any_config(
        None, ["task=classification", "dataset=deformed_fashion", "arch=resnet18", "dcn=v2", "dcn_stages=[5]"]
    )
    torch.manual_seed(0)
    run_file = tmp_path / "model_final.pth"
    torch.save({"model": build_classifier(cfg, 4).state_dict(), "config": cfg.to_dict()}, run_file)
    image_io.imsave(str(tmp_path / "image.png"), torch.rand(32, 32, 3).numpy())
    seen = {}

    def fake_plot(rows, image, nodes, out, **kwargs):
        seen.update(kwargs)
        return out

    monkeypatch.setattr(plotting, "plot_support_figure", fake_plot)
    parser = _analyze_parser()
    common = [
        "analyze",
        "--checkpoint",
        str(run_file),
        "--image",
        str(tmp_path / "image.png"),
        "--out",
        "x.png",
    ]
    args = parser.parse_args(common)
    assert args.func(args) == 0
    assert seen["title"] == "resnet18: layer4" and seen["weighting"] == "location"

    monkeypatch.undo()
    for extra, words in ((["--layer", "nope"], "not a module"), (["--channel", "100000"], "channel")):
        args = parser.parse_args([*common, "--no-saliency", *extra])
        with pytest.raises(SystemExit, match=words):
            args.func(args)


def test_location_weighting_is_the_default_of_figures():
    import inspect

    assert inspect.signature(plot_support_figure).parameters["weighting"].default == "location"


def test_roi_rectangles_and_box_categories_use_pixel_centre_coordinates():
    # imshow puts pixel centres at integers: a box (x1, y1, x2, y2), pixel j spanning [j, j + 1), is drawn
    # from (x1 - 0.5, y1 - 0.5); points are compared with boxes the same way (both used to be 0.5 off).
    from matplotlib.patches import Rectangle

    from deformable.analysis import make_node
    from deformable.analysis.plotting import _draw_node
    from deformable.analysis.statistics import _categorise

    class Axes:
        def __init__(self):
            self.patches = []

        def add_patch(self, patch):
            self.patches.append(patch)

    axes = Axes()
    _draw_node(axes, make_node("roi", (10, 12, 40, 50)), None, Rectangle)
    (patch,) = axes.patches
    assert patch.get_xy() == (9.5, 11.5) and (patch.get_width(), patch.get_height()) == (30, 38)

    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0]], dtype=torch.float64)  # pixels 0..3: centres in [-0.5, 3.5]
    points = torch.tensor([[-0.4, -0.4], [3.4, 3.4], [3.6, 1.0], [1.0, -0.6]])
    assert _categorise(points, boxes) == ["small", "small", "background", "background"]


def test_foreground_node_is_the_position_nearest_the_box_centre_in_pixel_centres():
    # Box (0, 0, 6, 6) covers pixels 0..5, centred on pixel-centre point (2.5, 2.5): position 1 of the
    # stride-2 map of layer "4" (image 2), not 2 (image 4, the nearest to the box coordinate 3).
    stats = support_statistics(
        stack(), [(torch.rand(3, 16, 16, dtype=torch.float64), [[0.0, 0.0, 6.0, 6.0]])], "4",
        backgrounds_per_image=0, saliency=False, dilation=False,
    )  # fmt: skip
    assert [record.position for record in stats.nodes] == [(1, 1)]


def test_analyze_builds_the_builders_default_stages():
    """Without --dcn-stages a DCNv1 detector is the builders' (and the paper's) DCNv1 row: conv5 only,
    with deformable pooling; --dcn-stages still chooses."""
    from deformable.analysis.cli import build_model
    from deformable.models import count_dcn_layers

    options = dict(backbone="resnet18", num_classes=3, min_size=64, max_size=64)
    v1 = build_model("fasterrcnn_resnet50_fpn_dcn", dcn="v1", **options)
    assert count_dcn_layers(v1) == 4  # resnet18's conv5: two blocks of two 3x3 convolutions
    assert (
        count_dcn_layers(build_model("fasterrcnn_resnet50_fpn_dcn", dcn="v1", dcn_stages=[4, 5], **options))
        == 8
    )
    assert count_dcn_layers(build_model("resnet18_dcn", dcn="v2")) == 12  # classifiers: conv3-5
