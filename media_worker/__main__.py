"""`python -m media_worker --model PATH --port N`: one media worker process."""

import argparse
import asyncio
import logging
import signal

from media_worker.server import serve
from vllm_mlx import lifeline
from vllm_mlx.settings import DEFAULT_HOST, DEFAULT_MEDIA_PORT, MediaSettings


def parse_args(argv: list[str] | None = None) -> MediaSettings:
    d = MediaSettings(model="")
    ap = argparse.ArgumentParser(prog="python -m media_worker", description=__doc__)
    ap.add_argument("--model", required=True,
                    help="the served model's folder (its processor prepares the media)")
    ap.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default loopback)")
    ap.add_argument("--port", type=int, default=DEFAULT_MEDIA_PORT)
    ap.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                    help="local files may be read under this folder (after resolving "
                         "links); repeatable; none by default")
    ap.add_argument("--allow-private-media-urls", action="store_true",
                    help="allow URLs that resolve to private, loopback or link-local addresses")
    ap.add_argument("--allowed-media-domains", nargs="+", action="extend", default=[],
                    metavar="HOST",
                    help="only fetch URLs on these hosts and their subdomains")
    ap.add_argument("--max-media-bytes", type=int, default=d.max_media_bytes,
                    help="largest download, data URL or local file")
    ap.add_argument("--media-fetch-timeout", type=float, default=d.fetch_timeout_s,
                    help="seconds one URL fetch may take in all, redirects included")
    ap.add_argument("--max-media-redirects", type=int, default=d.max_redirects)
    ap.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                    help="largest width x height of an image or video frame")
    ap.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds)
    ap.add_argument("--default-video-fps", type=float, default=d.default_video_fps,
                    help="frames sampled per second when a request does not say")
    ap.add_argument("--default-video-max-frames", type=int, default=d.default_video_max_frames)
    ap.add_argument("--max-video-fps", type=float, default=d.max_video_fps,
                    help="the most frames per second a request may ask for")
    ap.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                    help="the most frames a request may ask for")
    a = ap.parse_args(argv)
    for name in ("max_media_bytes", "max_image_pixels", "default_video_max_frames",
                 "max_video_frames"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("media_fetch_timeout", "max_video_seconds", "default_video_fps",
                 "max_video_fps"):
        if not getattr(a, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    return MediaSettings(
        model=a.model, host=a.host, port=a.port,
        allowed_local_media_paths=tuple(a.allowed_local_media_path),
        allow_private_media_urls=a.allow_private_media_urls,
        allowed_media_domains=tuple(a.allowed_media_domains),
        max_media_bytes=a.max_media_bytes, fetch_timeout_s=a.media_fetch_timeout,
        max_redirects=a.max_media_redirects, max_image_pixels=a.max_image_pixels,
        max_video_seconds=a.max_video_seconds, default_video_fps=a.default_video_fps,
        default_video_max_frames=a.default_video_max_frames, max_video_fps=a.max_video_fps,
        max_video_frames=a.max_video_frames)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    lifeline.watch()  # end with vllm-mlx-up, however it ends
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await serve(settings)
        except asyncio.CancelledError:
            logging.getLogger("media").info("stopped by signal")

    asyncio.run(run())


if __name__ == "__main__":
    main()
