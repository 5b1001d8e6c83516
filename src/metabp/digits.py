"""scikit-learn's 8x8 handwritten digits as image classes in Omniglot's format (chapter 6.2).

A target domain for few-shot learners meta-trained on Omniglot characters: ten
classes (the digits), shipped with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import positive_int
from .episodes import ImageClasses

#: Drawings kept per digit class; scikit-learn's data set has 174 to 183 per class,
#: and :class:`~metabp.episodes.ImageClasses` needs the same number for every class.
DIGITS_DRAWINGS = 174


def load_digits(size: int = 28, box: int = 20, drawings: int = DIGITS_DRAWINGS) -> ImageClasses:
    """scikit-learn's handwritten digits (Alpaydin & Kaynak, UCI) as ten image classes.

    Each 8x8 image (intensities 0 to 16, ink high) is scaled up bilinearly to a
    ``box`` x ``box`` square and centred on a ``size`` x ``size`` background, as MNIST
    centres its digits in a 20-pixel box of a 28-pixel image; intensities are mapped
    to 0..255. The first ``drawings`` images of every digit, in the data set's order,
    are kept.

    Returns:
        :class:`~metabp.episodes.ImageClasses` ``(10, drawings, size, size)``, class ``d``
        named ``"digits/d"``.
    """
    positive_int("size", size)
    positive_int("box", box)
    positive_int("drawings", drawings)
    if box > size:
        raise ValueError(f"box must be at most size ({size}), got {box}")
    if drawings > DIGITS_DRAWINGS:
        raise ValueError(f"drawings must be at most {DIGITS_DRAWINGS} (the rarest digit's count), got {drawings}")
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:  # pragma: no cover - scikit-learn is a requirement
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from error
    data = sklearn_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(data.target)
    big = F.interpolate(images.unsqueeze(1), size=(box, box), mode="bilinear", align_corners=False).squeeze(1)
    pad = size - box
    big = F.pad(big, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    pixels = (big.clamp(0, 1) * 255).round().to(torch.uint8)
    per_class = [pixels[targets == d][:drawings] for d in range(10)]
    return ImageClasses(torch.stack(per_class), tuple(f"digits/{d}" for d in range(10)))
