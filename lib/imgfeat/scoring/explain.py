"""Where the model looked: a class map over the backbone's last feature map, drawn over the image.

Every imgfeat backbone ends in global average pooling: the features f are the spatial mean of the last
feature map A (h x w x c). For a head whose class score is linear in f (lr, svc, the Keras head without a hidden
layer) with direction d (``HeadArrays.class_direction``: class k's weights minus the classes' mean), the score is
mean over (x, y) of A(x, y) . d plus a constant, so the map A(x, y) . d is the class activation map (CAM) and is
exact: its mean is the score's share from the image. For a hidden layer the direction is the gradient of the class
score at f (Grad-CAM at the last convolution: dscore/dA(x, y) = gradient / (h w) everywhere, computed in closed
form from the head's weights). Trees have no gradient: their direction is Saabas' path contributions per feature
divided by the feature's value, so the map's mean again adds up to what the decision paths gave the class.
Positive evidence is shown (values below 0 are cut), scaled to 0..1 per image.

Limits: the map has the feature map's resolution (7 x 7 for 224-px EfficientNet-Lite0 and ResNet-50), upsampled
bilinearly; it says which regions moved this head's score, not that they are pathology; tree maps are coarse.
"""

from __future__ import annotations

import io

import numpy as np

from imgfeat.scoring.heads import HeadArrays

# A perceptually ordered colour map (anchors of matplotlib's "inferno"), so the page needs no plotting library.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                     [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def class_map(head: HeadArrays, maps: np.ndarray, features: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """(h, w) map in 0..1 for class ``k`` from one image's feature map (h, w, c) and pooled features (c,)."""
    direction, how = head.class_direction(features, k)
    heat = np.asarray(maps, dtype=np.float64) @ direction
    heat = np.maximum(heat, 0.0)
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32), how


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) in 0..1 -> (h, w, 3) uint8."""
    t = np.clip(heat, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(t).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (t - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def overlay_png(model_input: np.ndarray, heat: np.ndarray, width: int, height: int, resize_mode: str,
                longest: int = 512, alpha: float = 0.45) -> bytes:
    """PNG of the heat map over the image as the model saw it; with ``stretch`` resizing, drawn back at the
    image's own aspect ratio (at most ``longest`` pixels), else at the model's square input."""
    from PIL import Image

    base = Image.fromarray(np.clip(model_input, 0, 255).astype(np.uint8), "RGB").convert("L").convert("RGB")
    if resize_mode == "stretch" and width and height:
        scale = longest / max(width, height)
        size = (max(1, round(width * min(1.0, scale))), max(1, round(height * min(1.0, scale))))
    else:
        size = base.size
    base = base.resize(size, Image.Resampling.BILINEAR)
    smooth = Image.fromarray(np.asarray(heat, dtype=np.float32), "F").resize(size, Image.Resampling.BILINEAR)
    heat_rgb = Image.fromarray(colorize(np.asarray(smooth)), "RGB")
    out = io.BytesIO()
    Image.blend(base, heat_rgb, alpha).save(out, "PNG")
    return out.getvalue()
