"""The `composer` command. Each command loads the spec, calls one function, prints. No logic here."""
from __future__ import annotations

import json
import sys

import click

from composer.errors import UserError

set_option = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                          help="Override a spec field, e.g. --set train.epochs=5 (repeatable).")


class Group(click.Group):
    """Turns every UserError into its message on stderr and its exit code, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}" if "\n" not in str(exc) else str(exc), err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:
            if type(exc).__name__ != "BackendUnavailable":  # kernels is imported lazily: match by name
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=Group)
def main():
    """Compose, summarize, train and inspect vision models described in YAML."""


@main.command()
@click.argument("specs", nargs=-1, required=True)
@set_option
def validate(specs, overrides):
    """Check spec files; print OK or every problem with FILE:LINE:COL."""
    from composer.spec import SpecError, load_spec

    problems = []
    for path in specs:
        try:
            spec = load_spec(path, overrides)
            layers = ", ".join(b.kind if b.repeat == 1 else f"{b.kind} x{b.repeat}" for b in spec.model.blocks)
            click.echo(f"{path}: OK ({spec.name}: {layers})")
        except SpecError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecError(problems)


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the schema here instead of stdout.")
def schema(output):
    """Print the JSON Schema of spec files (for editor validation)."""
    from composer.spec import Spec

    text = json.dumps(Spec.model_json_schema(), indent=2)
    if output:
        try:
            with open(output, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {output}: {exc.strerror}") from None
        click.echo(f"wrote {output}")
    else:
        click.echo(text)


@main.command()
@click.argument("spec_paths", metavar="SPEC...", nargs=-1, required=True)
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1), help="Batch for shapes/memory.")
@click.option("--kernels", "backend", type=click.Choice(["auto", "triton", "reference"]), default=None,
              help="Kernel backend to report (default: the spec's train.kernels).")
@click.option("--merge", type=click.IntRange(min=0), default=None, metavar="R",
              help="Shapes and FLOPs with token merging (R pairs merged in each attention block at the end of the "
                   "model; as evaluate --merge; default: model.token_merging).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@set_option
def summarize(spec_paths, batch_size, backend, merge, as_json, overrides):
    """Per-block shapes, parameters, FLOPs, activation memory and kernel path; with several
    specs, one row each, side by side."""
    from composer.spec import SpecError, load_spec
    from composer.summarize import render, render_comparison, summarize as run

    specs, problems = [], []
    for path in spec_paths:   # every spec's problems at once
        try:
            specs.append(load_spec(path, overrides))
        except SpecError as exc:
            problems += exc.problems
    if problems:
        raise SpecError(problems)
    results = [run(spec, batch_size=batch_size, backend=backend, merge=merge) for spec in specs]
    if as_json:
        click.echo(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    else:
        from rich.console import Console

        console = Console()
        if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
            console = Console(width=200)
        console.print(render(results[0]) if len(results) == 1 else render_comparison(results))


def _spec_overrides(overrides, **options):
    """CLI options that mirror train.* fields become --set overrides (validated the same way)."""
    extra = [f"train.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in options.items() if v is not None]
    return list(overrides) + extra


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory (default runs/<name>).")
@click.option("--resume", default=None, help="'auto' (newest checkpoint in the run dir) or a checkpoint path.")
@click.option("--epochs", type=int, default=None, help="Shortcut for --set train.epochs=N.")
@click.option("--kernels", type=click.Choice(["auto", "triton", "reference"]), default=None,
              help="Shortcut for --set train.kernels=... (auto: Triton where it can run; triton: an error where it cannot).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Shortcut for --set train.device=... (auto: CUDA when available).")
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile the model.")
@click.option("--cuda-graph/--no-cuda-graph", default=None,
              help="Shortcut for --set train.cuda_graph=true|false: replay each step's forward and backward "
                   "from one CUDA graph.")
@click.option("--deterministic/--no-deterministic", default=None,
              help="Deterministic algorithms (exact resumes on CPU; slower on CUDA).")
@set_option
def train(spec_path, out_dir, resume, epochs, kernels, device, compile_, cuda_graph, deterministic, overrides):
    """Train the model of SPEC, with checkpoints and resume."""
    from composer.spec import load_spec
    from composer.train import train as run

    ov = _spec_overrides(overrides, epochs=epochs, kernels=kernels, device=device,
                         compile=None if compile_ is None else str(compile_).lower(),
                         cuda_graph=None if cuda_graph is None else str(cuda_graph).lower(),
                         deterministic=None if deterministic is None else str(deterministic).lower(),
                         out_dir=out_dir)
    spec = load_spec(spec_path, ov)
    result = run(spec, resume=resume)
    click.echo(json.dumps(result["final"]))


@main.command()
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.option("--data-root", default=None, help="Evaluate on another folder/archive with the same classes.")
@click.option("--labels", default=None, metavar="CSV",
              help="A CSV of image,class rows naming the classes of --data-root's images (when they are not in "
                   "class subfolders).")
@click.option("--split", type=click.Choice(["val", "test"]), default=None, help="Default: test when the dataset has one.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--flip", is_flag=True, help="Test-time augmentation: average each image's class probabilities with "
                                          "its mirror image's.")
@click.option("--crop", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, metavar="FRACTION",
              help="Decode each image file's centre (the shorter side to size / FRACTION, then the central square; "
                   "timm evaluates at 0.875). Default: as the run's data.crop.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate at another input size (a learned position table resized to the new grid, as fine-tuning "
                   "does; FixRes: models trained on random crops often do better a little above their size).")
@click.option("--merge", type=click.IntRange(min=0), default=None, metavar="R",
              help="Token merging (ToMe): merge R pairs of similar tokens in each attention block at the end of "
                   "the model, for speed (no retraining; accuracy usually drops a little). Default: the model's "
                   "own (model.token_merging); 0: none.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(target, data_root, labels, split, batch_size, device, flip, crop, image_size, merge, as_json):
    """Accuracy (top-1, top-5), loss, per-class accuracy and the most confused classes of a trained run."""
    from composer.evaluate import evaluate as run, render

    result = run(target, data_root=data_root, split=split, batch_size=batch_size, device=device, flip=flip,
                 labels=labels, crop=crop, image_size=image_size, merge=merge)
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@main.command()
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.argument("images", nargs=-1, required=True)
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes listed per image.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--flip", is_flag=True, help="Average each image's class probabilities with its mirror image's.")
@click.option("--crop", type=click.FloatRange(0.0, 1.0, min_open=True), default=None, metavar="FRACTION",
              help="Decode each image's centre (as evaluate --crop). Default: as the run's data.crop.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Classify at another input size (as evaluate --image-size).")
@click.option("--merge", type=click.IntRange(min=0), default=None, metavar="R",
              help="Token merging: R pairs of tokens merged in each attention block at the end of the model "
                   "(as evaluate --merge; default: the model's own).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None,
              help="Also write image,class,probability rows (each image's top class) to this CSV file.")
def predict(target, images, top, batch_size, device, flip, crop, image_size, merge, as_json, csv_path):
    """Classify IMAGES (files, or folders of them) with a trained run: the top classes and their probabilities."""
    from composer.evaluate import predict as run, render_predictions, write_predictions_csv

    result = run(target, list(images), top=top, batch_size=batch_size, device=device, flip=flip, crop=crop,
                 image_size=image_size, merge=merge)
    if csv_path:
        write_predictions_csv(result, csv_path)
    click.echo(json.dumps(result, indent=2) if as_json else render_predictions(result))
    if csv_path and not as_json:
        click.echo(f"wrote {csv_path}: {len(result['predictions'])} rows of image,class,probability")


@main.command()
@click.argument("spec_path", metavar="SPEC")
@click.option("--vary", "axes", multiple=True, required=True, metavar="KEY.PATH=V1,V2,...",
              help="A field and the values to try, e.g. --vary train.optimizer.lr=1e-3,3e-3 (repeatable: "
                   "every combination trains).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder of the sweep's runs (default runs/<name>-sweep).")
@set_option
def sweep(spec_path, axes, out_dir, overrides):
    """Train SPEC for every combination of the --vary values, each into its own run directory;
    started again, it continues where it stopped. Prints the runs, best first."""
    from composer.runs import best_first, render
    from composer.sweep import sweep as run

    rows = run(spec_path, list(axes), list(overrides), out_dir)   # logs as composer train does
    click.echo(render(best_first(rows)))


@main.command("soup")
@click.argument("targets", nargs=-1, required=True, metavar="RUN_OR_FOLDER...")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run directory of the soup.")
@click.option("--uniform", is_flag=True, help="Average every run (default: greedy, each run kept only if the soup's "
                                               "validation accuracy holds).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the greedy soup's validation runs.")
def soup(targets, out, uniform, device):
    """Model soup: average the weights of runs fine-tuned from the same weights (run directories,
    or folders of them such as a sweep's) into one model."""
    from composer.soup import render, soup as run

    click.echo(render(run(list(targets), out, greedy=not uniform, device=device, echo=click.echo)))


@main.command("lr-find")
@click.argument("spec_path", metavar="SPEC")
@click.option("--start", type=click.FloatRange(min=0, min_open=True), default=1e-6, show_default=True,
              help="Learning rate of the first step.")
@click.option("--end", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Learning rate of the last step (the test stops earlier once the loss blows up).")
@click.option("--steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training steps, the learning rate growing geometrically over them (about 30 a decade by "
                   "default: fewer leave the model too little time at each rate to show its effect).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder of the CSV and the figure (default runs/<name>-lr-find).")
@set_option
def lr_find(spec_path, start, end, steps, out_dir, overrides):
    """The learning-rate range test: train SPEC's model briefly while the learning rate grows from
    --start to --end, and suggest a peak learning rate from where the loss falls fastest and where
    it is lowest. Writes the curve as a CSV and a figure; no run directory."""
    from composer.lr_find import lr_find as run, render
    from composer.spec import load_spec

    spec = load_spec(spec_path, list(overrides))
    click.echo(render(run(spec, start=start, end=end, steps=steps, out=out_dir, echo=click.echo)))


@main.command()
@click.argument("out", metavar="OUT.yaml")
@click.option("--data", required=True, metavar="FOLDER|KIND",
              help="An image folder (or archive) of <class>/<image>, or cifar10, cifar100, mnist, fashion_mnist, "
                   "digits, synthetic.")
@click.option("--arch", type=click.Choice(["vit", "mixer", "convmixer", "mixer+vit", "convmixer+mixer",
                                           "convnext+vit"]),
              default=None, help="The architecture (default vit).")
@click.option("--from", "source", metavar="RUN", help="Instead of --arch: fine-tune the model of a trained run or "
              "an import (composer import) on the data, its weights through train.init_from.")
@click.option("--val", metavar="FOLDER", help="A validation folder of the same classes (default: hold out 10%).")
@click.option("--labels", metavar="CSV", help="A CSV of image,class rows naming the classes of the folder's images "
                                              "(when they are not in class subfolders).")
@click.option("--image-size", type=click.IntRange(min=4), help="The model's input size (default: from the images).")
@click.option("--root", help="Where a torchvision dataset is (or will be downloaded); default data/<kind>.")
@click.option("--force", is_flag=True, help="Replace OUT.yaml if it exists.")
def init(out, data, arch, source, val, labels, image_size, root, force):
    """Write a starting spec for a dataset and an architecture, sized from the data (or for
    fine-tuning a run's model on it, --from)."""
    from composer.init import write_init

    result = write_init(out, data, arch=arch, val=val, image_size=image_size, root=root, force=force, labels=labels,
                        source=source)
    spec = result["spec"]
    what = f"fine-tuning {source}" if source else arch or "vit"
    click.echo(f"{result['found']}")
    click.echo(f"wrote {result['path']}: {what}, {result['params']:,} parameters, {spec.model.input_size}x"
               f"{spec.model.input_size} input, patch {spec.model.stem.patch_size}, batch {spec.train.batch_size}, "
               f"{spec.train.epochs} epochs")
    click.echo(f"next: composer summarize {result['path']}; composer train {result['path']}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json):
    """Versions, GPUs, whether the fused kernels run here (and why not), cache folders: for bug reports."""
    from composer.info import machine_info, render

    result = machine_info()
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@main.command("import")
@click.argument("weights", metavar="WEIGHTS|timm:NAME")
@click.argument("spec_path", metavar="[SPEC]", required=False)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The run directory to write.")
@click.option("--normalization", type=click.Choice(["inception", "imagenet", "clip"]),
              help="The input normalization the weights were trained with: inception (mean and std 0.5), imagenet "
                   "(0.485, 0.456, 0.406 / 0.229, 0.224, 0.225) or clip (OpenAI's: 0.481, 0.458, 0.408 / 0.269, "
                   "0.261, 0.276). Default: that of timm's default weights of the family (inception for ViT and "
                   "Mixer, imagenet for ConvMixer, ConvNeXt and Swin); timm:NAME reads the weights' own.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False),
              help="A text file of class names, one a line, in the classifier's order (default: 0, 1, ...).")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in --out.")
@set_option
def import_weights(weights, spec_path, out, normalization, classes_file, force, overrides):
    """Make a run directory from timm's weights of a ViT, MLP-Mixer, ConvMixer, ConvNeXt or Swin (.safetensors,
    .pth, .bin) for the model SPEC describes, or from timm's pretrained model NAME (timm downloads its weights; without
    SPEC, the spec is read from the model): then evaluate, predict, export or fine-tune it (train.init_from)."""
    from composer.timm_weights import import_timm, render

    click.echo(render(import_timm(weights, spec_path, out, list(overrides), normalization, classes_file, force)))


@main.command("runs")
@click.argument("paths", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_runs(paths, as_json):
    """The training runs in PATHS (run directories, or folders searched for them; default: runs),
    best validation accuracy first, with their size, progress and whether they are running."""
    from composer.runs import list_runs as find, render

    result = find(list(paths) or ["runs"])
    click.echo(json.dumps(result, indent=2) if as_json else render(result))


@main.command("export")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.argument("out", metavar="OUT.pt2|OUT.onnx")
@click.option("--merge", type=click.IntRange(min=0), default=None, metavar="R",
              help="Token merging built into the program: R pairs of tokens merged in each attention block at the "
                   "end of the model (as evaluate --merge; default: the model's own).")
def export_run(target, out, merge):
    """Save a trained run as one file for inference (torch.export .pt2 or .onnx): uint8 images in, logits out."""
    from composer.export import export
    from composer.merging import merge_note

    result = export(target, out, merge=merge)
    if result.get("merge"):
        click.echo(merge_note(result["merge"]))
    if result["path"].endswith(".onnx"):
        use = ("onnxruntime.InferenceSession(path).run(None, {'images': images}); class names and "
               "normalization in its metadata property composer.json")
    else:
        use = "torch.export.load(path).module()(images); class names and normalization in its extra file composer.json"
    click.echo(f"wrote {result['path']}: uint8 images {tuple(result['input']['shape'])} -> logits over "
               f"{len(result['classes'])} classes; {use}")


OUT_HELP = "Folder for the PNG files (default: figures/ in the run directory, the first one for curves)."


@main.group(cls=Group)
def visualize():
    """Figures of what each mixer learned (PNG files)."""


@visualize.command("attention")
@click.argument("run_dir")
@click.option("--image", "image_index", type=int, default=None, help="Index of the image in the split (default 0).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", show_default=True)
@click.option("--file", "image_file", type=click.Path(dir_okay=False), default=None,
              help="An image file of your own instead (the run's data is then not read).")
@click.option("--layer", type=int, default=None, help="Attention layer (0-based); default: all.")
@click.option("--head", type=int, default=None, help="Head (0-based); default: all.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_attention(run_dir, image_index, split, image_file, layer, head, out):
    """Attention matrices, per-query overlays and rollout for one image."""
    from composer.visualize import attention

    for path in attention(run_dir, image_index=image_index, split=split, layer=layer, head=head, out=out,
                          file=image_file):
        click.echo(path)


@visualize.command("token-mlp")
@click.argument("run_dir")
@click.option("--block", type=int, default=None, help="Token-MLP block (0-based); default: all.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_token_mlp(run_dir, block, out):
    """First-layer token-MLP weights as patch-grid images, one per hidden unit."""
    from composer.visualize import token_mlp

    for path in token_mlp(run_dir, block=block, out=out):
        click.echo(path)


@visualize.command("dwconv")
@click.argument("run_dir")
@click.option("--block", type=int, default=None, help="Depthwise-conv block (0-based); default: all.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_dwconv(run_dir, block, out):
    """Learned depthwise kernels, one tile per channel."""
    from composer.visualize import dwconv

    for path in dwconv(run_dir, block=block, out=out):
        click.echo(path)


@visualize.command("pos-embed")
@click.argument("run_dir")
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_pos_embed(run_dir, out):
    """Position embeddings: each patch's cosine similarity with every other patch, on the grid."""
    from composer.visualize import pos_embed

    for path in pos_embed(run_dir, out=out):
        click.echo(path)


@visualize.command("confusion")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT")
@click.option("--split", type=click.Choice(["val", "test"]), default=None, help="Default: test when the dataset has one.")
@click.option("--data-root", default=None, help="Another folder/archive with the same classes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the split is evaluated.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_confusion(target, split, data_root, device, out):
    """Which classes the run takes for which: the confusion matrix on a split."""
    from composer.visualize import confusion

    for path in confusion(target, split=split, data_root=data_root, out=out, device=device):
        click.echo(path)


@visualize.command("curves")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False), default=None, help=OUT_HELP)
def visualize_curves(run_dirs, out):
    """Loss and accuracy per epoch of one or more runs."""
    from composer.visualize import curves

    for path in curves(list(run_dirs), out=out):
        click.echo(path)


@main.group(cls=Group)
def bench():
    """Benchmarks: fused kernels against PyTorch, training throughput."""


@bench.command("kernels")
@click.option("--op", type=click.Choice(["attention", "token_mlp", "dwconv2d", "batch_norm", "all"]), default="all",
              show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp32", "all"]), default="all", show_default=True)
@click.option("--cuda-graph", is_flag=True,
              help="Also time each call replayed from a CUDA graph: GPU time without host overhead.")
@click.option("--sweep", is_flag=True,
              help="Instead: time every launch configuration of our kernels (kernel alone) and check each output.")
@click.option("--limit", type=click.IntRange(min=1),
              help="With --sweep: time only the first N candidates of each case (the never-timed ones come first).")
@click.option("--case", "only_case", metavar="TEXT",
              help="With --sweep: only the cases whose name ends with TEXT (e.g. backward, 'weight grad').")
@click.option("--save", is_flag=True,
              help="With --sweep: keep each shape's fastest correct configuration for this card "
                   "($COMPOSER_TUNED, default ~/.cache/composer/tuned.json); the kernels use it from then on.")
@click.option("--profile", is_flag=True,
              help="Instead: where our forward+backward spends its time (host vs GPU, Python hot spots, profiler tops).")
@click.option("--spec", "spec_path", metavar="SPEC",
              help="Use the shapes of this spec's model (at its batch size, or --batch-size) instead of the "
                   "built-in vision shapes: e.g. --sweep --save --spec my.yaml tunes the kernels for your model.")
@click.option("--batch-size", type=click.IntRange(min=1), help="With --spec: the batch size (default: the spec's).")
@set_option
def bench_kernels(op, dtype, cuda_graph, sweep, limit, only_case, save, profile, spec_path, batch_size, overrides):
    """Time each fused op against SDPA / eager / torch.compile / cuDNN on vision shapes."""
    from composer import bench as b

    if sweep and profile:
        raise UserError("--sweep and --profile are separate runs; pass one of them")
    if (save or limit or only_case) and not sweep:
        raise UserError("--save, --limit and --case are options of a sweep: pass them with --sweep")
    if (batch_size or overrides) and not spec_path:
        raise UserError("--batch-size and --set describe a spec's model: pass them with --spec")
    shapes = None
    if spec_path:
        from composer.spec import load_spec

        shapes = b.spec_shapes(load_spec(spec_path, overrides), batch_size)
        if not any(name in shapes for name in (b.OPS if op == "all" else (op,))):
            raise UserError(f"{spec_path}: its model runs none of the fused ops asked for "
                            f"({op}); it has {', '.join(shapes) or 'no attention, token_mlp or dwconv blocks'}")
        click.echo("shapes of " + spec_path + ": " + "; ".join(f"{k} {v}" for k, v in shapes.items()))
    if sweep:
        b.sweep_kernels(op=op, dtype=dtype, echo=click.echo, save=save, shapes=shapes, limit=limit,
                        only_case=only_case)
    elif profile:
        b.profile_kernels(op=op, dtype=dtype, echo=click.echo, shapes=shapes)
    else:
        b.bench_kernels(op=op, dtype=dtype, echo=click.echo, cuda_graph=cuda_graph, shapes=shapes)


@bench.command("infer")
@click.argument("target", metavar="RUN_DIR|CHECKPOINT|SPEC")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--merge", "merges", default=None, metavar="R[,R...]",
              help="Token merging settings to compare (R pairs merged in each attention block at the end of the "
                   "model; 0: none), e.g. 0,8,16. Default: the model's own (model.token_merging).")
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Forward passes of each setting, interleaved; the first two warm up.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def bench_infer(target, batch_size, merges, rounds, device):
    """Inference throughput (img/s) of a trained run or a spec's model, with and without token merging."""
    from composer import bench as b

    try:
        settings = None if merges is None else tuple(int(part) for part in merges.split(","))
    except ValueError:
        raise UserError(f"--merge {merges}: give whole numbers of tokens separated by commas, e.g. 0,8,16") from None
    if settings and any(r < 0 for r in settings):
        raise UserError(f"--merge {merges}: the tokens merged in each block cannot be negative")
    b.bench_infer(target, batch_size=batch_size, merges=settings, rounds=rounds, device=device, echo=click.echo)


@bench.command("train")
@click.argument("spec_path", metavar="SPEC")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True,
              help="Training steps per data source (the first few warm up untimed, so very small values are raised).")
@click.option("--data", "source", type=click.Choice(["real", "synthetic", "both"]), default="both",
              show_default=True, help="Time the spec's own data, same-shaped synthetic data, or both.")
@click.option("--profile", is_flag=True,
              help="Instead: profile the model's training step (synthetic batch) and list the operations "
                   "that take the most device time a step.")
@set_option
def bench_train(spec_path, steps, source, profile, overrides):
    """Training throughput (img/s) on real and synthetic data."""
    from composer import bench as b
    from composer.spec import load_spec

    spec = load_spec(spec_path, overrides)
    if profile:
        b.profile_train(spec, steps=min(steps, 10), echo=click.echo)
    else:
        b.bench_train(spec, steps=steps, source=source, echo=click.echo)


if __name__ == "__main__":
    main()
