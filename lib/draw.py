"""
Drawing shared by sample.py, tools/eval.py and tools/analyses.py: class colours, pictures upscaled to a
readable size, boxes with labels kept inside the picture and apart, and matplotlib figures saved at a
readable resolution.

    from lib.draw import draw_boxes, for_display
    picture, scale = for_display(image)                     # image (3, H, W) uint8
    draw_boxes(picture, boxes * scale, ["cat 0.93"], [class_colour(0)]).save("cat.png")
"""

import math
import os

from PIL import Image, ImageDraw, ImageFont


def class_colour(label):
    """A distinct, stable colour per class: hues spaced by the golden angle."""
    hue = (label * 0.618033988749895) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0))
    return rgb


MIN_SIDE = 512  # every picture is drawn with at least this short side: small images are upscaled first


def for_display(image):
    """(3, H, W) uint8 -> (the PIL image to draw on, upscaled to a short side of MIN_SIDE if smaller, the scale)."""
    H, W = image.shape[-2:]
    scale = max(1.0, MIN_SIDE / min(H, W))
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((round(W * scale), round(H * scale)), Image.BILINEAR)
    return picture, scale


def text_font(picture):
    """A font sized to the picture (Pillow's own, scalable), so that labels stay readable on any image."""
    return ImageFont.load_default(size=max(12, min(picture.size) // 32))


def place_labels(boxes, sizes, picture_size):
    """Where each label goes, (x, y, w, h) in the order given (the surest first): at the first of a few
    places at its box's corners (above the top-left one first), then up and down the box's left and
    right edges, nearest first, that lies inside the picture and covers no earlier label; only when
    none is free (more labels than the picture holds), at the one that covers least. So no label is
    cut off, and none sits on another. boxes: (x0, y0, x1, y1) each; sizes: (w, h) each."""
    W, H = picture_size
    placed = []
    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes):
        rows = sorted(range(0, max(1, H - h + 1), max(1, h)), key=lambda row: abs(row - y0))
        candidates = ([(x0, y0 - h), (x0, y0), (x0, y1), (x0, y1 - h), (x1 - w, y0 - h), (x1 - w, y1)]
                      + [(x, row) for row in rows for x in (x0, x1 - w)])
        # inside, or from the left/top edge
        candidates = [(max(0, min(x, W - w)), max(0, min(y, H - h))) for x, y in candidates]

        def covered(corner):
            x, y = corner
            return sum(max(0, min(x + w, a + c) - max(x, a)) * max(0, min(y + h, b + d) - max(y, b))
                       for a, b, c, d in placed)

        # the first free place (no need to weigh the rest), else the one that covers least
        x, y = next((c for c in candidates if not covered(c)), None) or min(candidates, key=covered)
        placed.append((x, y, w, h))
    return placed


def draw_boxes(picture, boxes, texts, colours, widths=None):
    """Draw boxes (K, 4) xyxy in the picture's pixels (widths: their line widths, else one to suit the
    picture), each with its text on a label filled with its colour, after every box (place_labels)."""
    draw = ImageDraw.Draw(picture)
    font = text_font(picture)
    widths = widths or [max(2, min(picture.size) // 200)] * len(boxes)
    for (x0, y0, x1, y1), colour, width in zip(boxes.tolist(), colours, widths):
        # a dark edge: seen on any background
        draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline="black", width=width + 2)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    extents = [draw.textbbox((0, 0), text, font=font) for text in texts]  # (left, top, right, bottom) each
    sizes = [(right - left + 6, bottom - top + 4) for left, top, right, bottom in extents]
    for (x, y, w, h), (left, top, _, _), text, colour in zip(place_labels(boxes.tolist(), sizes, picture.size),
                                                             extents, texts, colours):
        draw.rectangle((x, y, x + w - 1, y + h - 1), fill=colour, outline="black")
        dark = sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114))) < 140
        draw.text((x + 3 - left, y + 2 - top), text, fill="white" if dark else "black", font=font)
    return picture


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: this picture needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(fig, out_path, what, rect=None):
    """Lay the figure out (within rect of the figure, leaving room for a legend below or a title above),
    save it at a resolution that gives its short side at least MIN_SIDE pixels, and say so in one line."""
    fig.tight_layout(rect=rect)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, dpi=max(80, math.ceil(MIN_SIDE / min(fig.get_size_inches()))))
    pyplot().close(fig)  # pyplot keeps every figure until it is closed
    print(f"{what} -> {out_path}")
    return out_path
