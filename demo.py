"""Place objects on a canvas, generate, and see what the judge finds: a local web page (gradio).

    python demo.py                      # http://127.0.0.1:7860: the shipped model and judge
    python demo.py --checkpoint runs/NAME --port 8000

Pick a label and click the canvas to put it there, or add it without a position and let the
model's layout prior place it; every object has a position or none (sample.py's --labels rule:
the objects box holds the same text). Sampling is sample.py's `generate`, the verdict is
evaluate.py's judge and wording (docs/usage.md says what each control does).
"""
import argparse
import functools
import os
from pathlib import Path

# gradio reports usage to a server unless told not to, and this machine may have no network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in sample.py: idle threads sleep

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

import sample  # noqa: E402
from dataloader import (COLORS, IMAGE_SIZE, LABELS, SHAPES, DataError, _rel,  # noqa: E402
                        encode, first_line, listed_order, parse_placed_labels, portable_path,
                        repo_path, resolve_device, run_cli, to_float, to_uint8)
from evaluator import evaluation_model, miss_kinds, per_image  # noqa: E402
from model import WEIGHTS_DIR, resolve_checkpoint  # noqa: E402
from render import COLOR_SRGB  # noqa: E402

MAX_OBJECTS = 5
MAX_IMAGES = 16
SCALE = 6  # the 64x64 canvas and images are shown 6x larger, nearest-neighbour
MARK = 4   # px at 64x64: half the size of a placed object's mark on the canvas


class App:
    """The page's state that outlives a request: the judge and the diffusion models loaded so
    far (by resolved checkpoint path), on one device."""

    def __init__(self, checkpoint, device):
        self.device = resolve_device(device)
        self.default = portable_path(checkpoint)  # shown on the page: relative to the repo
        self.models = {}
        self.model(self.default)  # an unknown --checkpoint stops the script at once
        self.judge = evaluation_model(device=self.device)

    def resolve(self, checkpoint):
        """The checkpoint folder the page's text names (relative paths: to the repository)."""
        return resolve_checkpoint(repo_path(checkpoint.strip() or self.default))

    def model(self, checkpoint):
        """(model, scheduler config, scored settings, checkpoint folder) of the checkpoint the
        page's text names, loaded once."""
        ckpt = self.resolve(checkpoint)
        if ckpt not in self.models:
            model, sched = sample.load_model(ckpt, self.device)
            self.models[ckpt] = (model, sched, sample.scored_settings(ckpt), ckpt)
        return self.models[ckpt]


# ---------------------------------------------------------------- pictures

def canvas_image(text):
    """The canvas: an i-CLEVR-toned backdrop with a mark where each placed object is (a square,
    circle or tall box in its color, numbered in the objects box's order)."""
    size = IMAGE_SIZE * SCALE
    rows = torch.linspace(0, 1, size)[:, None].expand(size, size)
    tone = torch.where(rows < 1 / 3, 106.0, 106.0 + 44.0 * (rows - 1 / 3) * 1.5)
    im = Image.fromarray(tone.clamp(0, 255).byte().numpy()).convert("RGB")
    draw = ImageDraw.Draw(im)
    for i in range(0, size, 8 * SCALE):  # a grid line every 8 pixels of the image
        draw.line([(i, 0), (i, size)], fill=(120, 120, 120))
        draw.line([(0, i), (size, i)], fill=(120, 120, 120))
    try:
        labels, positions = parse_placed_labels(text)
    except DataError:
        return im  # the message comes with Generate
    for k, (name, xy) in enumerate(zip(labels, positions or [])):
        color, shape = name.split()
        x, y, r = xy[0] * SCALE, xy[1] * SCALE, MARK * SCALE
        box = {"cube": (x - r, y - r, x + r, y + r), "sphere": (x - r, y - r, x + r, y + r),
               "cylinder": (x - 0.8 * r, y - 1.2 * r, x + 0.8 * r, y + 1.2 * r)}[shape]
        fill, line = COLOR_SRGB[color], (255, 255, 255)
        (draw.ellipse if shape == "sphere" else draw.rectangle)(box, fill=fill, outline=line,
                                                                 width=2)
        draw.text((x + r + 3, y - r), str(k + 1), fill=(0, 0, 0))
    return im


def shown(image, layout, marks):
    """uint8 (3, 64, 64) -> PIL image SCALE times larger (nearest-neighbour); with marks, each
    object's ellipse from its layout row (class, x, y, rx, ry) outlined and numbered."""
    im = Image.fromarray(image.permute(1, 2, 0).numpy()).resize(
        (IMAGE_SIZE * SCALE,) * 2, Image.NEAREST)
    if marks:
        draw = ImageDraw.Draw(im)
        for k, (cls, x, y, rx, ry) in enumerate(layout.tolist()):
            if cls < 0:
                continue
            box = [(x - rx) * SCALE, (y - ry) * SCALE, (x + rx) * SCALE, (y + ry) * SCALE]
            draw.ellipse(box, outline=(255, 255, 255), width=2)
            draw.text((box[2] + 2, box[1]), str(k + 1), fill=(255, 255, 255))
    return im


def verdict_line(i, row):
    """One image's verdict in evaluate.py's words: found k/n, what was missed and why, and any
    object the judge also sees (score > 0.5) that was not asked for."""
    line = f"image {i + 1}: {row['correct']}/{row['total']}"
    if row["missing"]:
        m = miss_kinds([row])
        kinds = ", ".join(f"{m[k]} {k.replace('_', ' ')}" for k in ("wrong_shape", "wrong_color",
                                                                    "neither") if m[k])
        line += (f" | missed {', '.join(row['missing'])} ({kinds}) | judge saw "
                 f"{', '.join(row['extra'])} instead")
    else:
        line += ", all found"
    extra = [name for name in row["found"] if name not in row["labels"]]
    return line + (f" | also sees {', '.join(extra)}" if extra else "")


# ---------------------------------------------------------------- what the controls do

def place(text, label, evt: gr.SelectData):
    """A click on the canvas at evt.index (canvas pixels) puts label there."""
    x, y = (round(v / SCALE, 1) for v in evt.index)
    text = f"{text.strip()}, {label}@{x:g},{y:g}" if text.strip() else f"{label}@{x:g},{y:g}"
    return text, canvas_image(text)


def add_unplaced(text, label):
    text = f"{text.strip()}, {label}" if text.strip() else label
    return text, canvas_image(text)


def check_request(text, n, seed, guidance, steps):
    """(labels, positions, n, seed, guidance, steps) as sample.generate takes them, or a
    DataError that says what is wrong."""
    labels, positions = parse_placed_labels(text, where="objects")
    if len(labels) > MAX_OBJECTS:
        raise DataError(f"{len(labels)} objects: the page draws 1 to {MAX_OBJECTS}")
    try:
        n, seed, guidance, steps = int(n), int(seed), float(guidance), int(steps)
    except (TypeError, ValueError):
        raise DataError("images, seed, guidance and steps: expected numbers") from None
    if not (1 <= n <= MAX_IMAGES and 1 <= steps <= 1000 and 0 <= guidance <= 20):
        raise DataError(f"images 1-{MAX_IMAGES}, steps 1-1000 and guidance 0-20, got {n}, "
                        f"{steps} and {guidance:g}")
    return labels, positions, n, seed, guidance, steps


def run(app, text, n, seed, guidance, steps, marks, checkpoint, progress):
    """Generate and judge -> (images, verdict, strip, message, details)."""
    labels, positions, n, seed, guidance, steps = check_request(text, n, seed, guidance, steps)
    model, sched, scored, ckpt = app.model(checkpoint)
    y = encode(labels, "objects")[None].repeat(n, 1)
    where = _rel(ckpt)
    layouts = sample.layouts_for(model, y, sample.placed_layouts(model, labels, positions, n,
                                                                 where), seed,
                                 listed_order([labels] * n))
    progress(0, desc="sampling")
    images, traj = sample.generate(model, y, sampler=scored["sampler"], steps=steps,
                                   guidance=guidance, seed=seed, scheduler_config=sched,
                                   layouts=layouts, return_trajectory=True, device=app.device)
    pixels = to_uint8(images)
    rows = per_image(app.judge.scores(to_float(pixels)), y)  # the judge sees what a PNG holds
    gallery = [(shown(img, lay, marks), f"image {i + 1}")
               for i, (img, lay) in enumerate(zip(pixels, layouts))]
    strip = make_grid(to_uint8(sample.process_strip(images, traj)), nrow=sample.PROCESS_FRAMES,
                      padding=2, pad_value=255)
    strip = Image.fromarray(strip.permute(1, 2, 0).numpy())
    strip = strip.resize((strip.width * 2, strip.height * 2), Image.NEAREST)
    found = sum(r["correct"] for r in rows)
    total = sum(r["total"] for r in rows)
    verdict = "\n".join([f"judge: {found}/{total} objects found"] +
                        [verdict_line(i, r) for i, r in enumerate(rows)])
    details = {"checkpoint": where, "labels": labels, "placed": positions is not None,
               "seed": seed, "steps": steps, "guidance": guidance,
               "layouts": layouts.tolist(), "verdicts": rows}
    return gallery, verdict, strip, "", details


def generate(app, text, n, seed, guidance, steps, marks, checkpoint,
             progress=gr.Progress(track_tqdm=True)):
    """run(), with bad input as a one-line message in place of the results."""
    try:
        return run(app, text, n, seed, guidance, steps, marks, checkpoint, progress)
    except DataError as e:
        return [], "", None, f"**error:** {first_line(e)}", {}


# ---------------------------------------------------------------- the page

def build(app):
    scored = app.model(app.default)[2]
    with gr.Blocks(title="iclevr-ddpm demo") as page:
        gr.Markdown("## i-CLEVR: place objects, generate, judge\nPick a label, then click the "
                    "canvas to place it, or add it without a position and let the model's "
                    "layout prior place it (every object placed, or none).")
        with gr.Row():
            with gr.Column():
                label = gr.Dropdown(LABELS, value="red sphere", label="object", elem_id="object")
                canvas = gr.Image(canvas_image(""), label="scene (click to place)",
                                  interactive=False, buttons=[], elem_id="canvas",
                                  height=IMAGE_SIZE * SCALE, width=IMAGE_SIZE * SCALE)
                with gr.Row():
                    unplaced = gr.Button("add without position")
                    clear = gr.Button("clear")
                objects = gr.Textbox("", label="objects (label@x,y in pixels of the 64x64 "
                                     f"image; at most {MAX_OBJECTS})", elem_id="objects")
                with gr.Row():
                    n = gr.Number(4, label="images", precision=0, minimum=1, maximum=MAX_IMAGES)
                    seed = gr.Number(0, label="seed", precision=0)
                with gr.Row():
                    guidance = gr.Number(scored["guidance"], label="guidance", minimum=0)
                    steps = gr.Number(scored["steps"], label=f"{scored['sampler']} steps",
                                      precision=0, minimum=1)
                marks = gr.Checkbox(False, label="draw the positions over the images",
                                    elem_id="marks")
                checkpoint = gr.Textbox(app.default, label="checkpoint")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                message = gr.Markdown("")
                gallery = gr.Gallery(label="generated", columns=2, object_fit="contain",
                                     height="auto", format="png")
                verdict = gr.Textbox(label="judge", lines=5, elem_id="verdict")
                strip = gr.Image(label="denoising (x_t above, x0 estimate below), image 1",
                                 interactive=False, format="png", height=220)
                details = gr.JSON(label="details", visible=False)
        canvas.select(place, [objects, label], [objects, canvas])
        unplaced.click(add_unplaced, [objects, label], [objects, canvas])
        clear.click(lambda: ("", canvas_image("")), None, [objects, canvas])
        objects.change(canvas_image, objects, canvas)
        go.click(functools.partial(generate, app),
                 [objects, n, seed, guidance, steps, marks, checkpoint],
                 [gallery, verdict, strip, message, details], api_name="generate")
    return page



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=WEIGHTS_DIR,
                    help="diffusion model the page starts with (default: weights/ddpm)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (0.0.0.0 opens the page to the network)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    app = App(args.checkpoint, args.device)
    print(f"demo: {_rel(resolve_checkpoint(args.checkpoint))} on {app.device}, "
          f"{len(COLORS) * len(SHAPES)} labels", flush=True)
    build(app).queue().launch(server_name=args.host, server_port=args.port, inbrowser=False,
                              show_error=False, footer_links=[], ssr_mode=False)


if __name__ == "__main__":
    run_cli(main)
