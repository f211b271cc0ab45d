"""Image bytes -> one upright RGB Pillow image, with the pixel cap checked from
the header before any pixel is decoded."""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from media_worker.errors import MediaError

# Our own cap (checked below) is the guard; Pillow's global one would refuse
# with a less useful message, or warn.
Image.MAX_IMAGE_PIXELS = None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: keep the top byte; convert() would clip to white.
        arr = np.asarray(img)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            arr8 = arr.astype(np.uint8)
        else:
            arr8 = (arr.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray((arr * scale).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels over white, as a viewer shows them, rather than
        # whatever colour the encoder left under alpha 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode `data` (first frame of an animation), apply EXIF orientation and
    return it as RGB; MediaError for anything unreadable or too large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise MediaError("not a recognised image format") from None
    except Exception as e:  # any decoder failure is bad input
        raise MediaError(f"cannot read the image: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise MediaError(f"image is {width}x{height} = {width * height} pixels, over the "
                         f"limit of {max_pixels}")
    if width == 0 or height == 0:
        raise MediaError("image has no pixels")
    try:
        # Pillow opens animations at frame 0; load() decodes only that frame.
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except Exception as e:  # truncated, corrupt, unsupported mode
        raise MediaError(f"the image is truncated or corrupt: {e}") from None
