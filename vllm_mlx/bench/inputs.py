"""Media the benchmarks make for themselves: photo-like JPEGs and H.264
clips, real encoded files that go through the same decoding as a user's."""

import base64
import io


def photo_like(w: int, h: int, seed: int = 0):
    """Smooth gradients plus noise: compresses and decodes like a photo, not
    like a flat colour or pure noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    noise = 12 * rng.standard_normal((h, w, 3), dtype=np.float32)
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def jpeg(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def encode_clip(seconds: int, fps: int, w: int, h: int) -> bytes:
    """An H.264 (yuv420p, x264 'veryfast') MP4 with moving content."""
    import av
    import numpy as np

    img = np.asarray(photo_like(w + seconds * fps * 4, h))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(seconds * fps):
            frame = np.ascontiguousarray(img[:, i * 4:i * 4 + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
