"""The media workers' command-line flags, shared by `python -m media_worker`
and `vllm-mlx-up` (which passes them on to each worker it starts)."""

import argparse

from vllm_mlx.settings import MediaSettings

_POSITIVE = ("media_fetch_timeout", "max_video_seconds", "default_video_fps", "max_video_fps")
_AT_LEAST_ONE = ("max_media_bytes", "max_image_pixels", "default_video_max_frames",
                 "max_video_frames")


def add_media_arguments(ap: argparse.ArgumentParser) -> None:
    d = MediaSettings(model="")
    g = ap.add_argument_group("media (images and videos for vision-language models)")
    g.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                   help="local files may be read under this folder (after resolving "
                        "links); repeatable; none by default")
    g.add_argument("--allow-private-media-urls", action="store_true",
                   help="allow URLs that resolve to private, loopback or link-local addresses")
    g.add_argument("--allowed-media-domains", nargs="+", action="extend", default=[],
                   metavar="HOST", help="only fetch URLs on these hosts and their subdomains")
    g.add_argument("--max-media-bytes", type=int, default=d.max_media_bytes,
                   help="largest download, data URL or local file")
    g.add_argument("--media-fetch-timeout", type=float, default=d.fetch_timeout_s,
                   help="seconds one URL fetch may take in all, redirects included")
    g.add_argument("--max-media-redirects", type=int, default=d.max_redirects,
                   help="redirects one URL fetch may follow")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help="largest width x height of an image or video frame")
    g.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds,
                   help="longest video accepted")
    g.add_argument("--default-video-fps", type=float, default=d.default_video_fps,
                   help="frames sampled per second when a request does not say")
    g.add_argument("--default-video-max-frames", type=int, default=d.default_video_max_frames,
                   help="frames sampled at most when a request does not say")
    g.add_argument("--max-video-fps", type=float, default=d.max_video_fps,
                   help="the most frames per second a request may ask for")
    g.add_argument("--max-video-frames", type=int, default=d.max_video_frames,
                   help="the most frames a request may ask for")


def check_media_arguments(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in _AT_LEAST_ONE:
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in _POSITIVE:
        if not getattr(a, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")


def media_settings(a: argparse.Namespace, model: str, host: str, port: int) -> MediaSettings:
    return MediaSettings(
        model=model, host=host, port=port,
        allowed_local_media_paths=tuple(a.allowed_local_media_path),
        allow_private_media_urls=a.allow_private_media_urls,
        allowed_media_domains=tuple(a.allowed_media_domains),
        max_media_bytes=a.max_media_bytes, fetch_timeout_s=a.media_fetch_timeout,
        max_redirects=a.max_media_redirects, max_image_pixels=a.max_image_pixels,
        max_video_seconds=a.max_video_seconds, default_video_fps=a.default_video_fps,
        default_video_max_frames=a.default_video_max_frames, max_video_fps=a.max_video_fps,
        max_video_frames=a.max_video_frames)


def media_worker_argv(a: argparse.Namespace) -> list[str]:
    """The flags that give a media worker the settings parsed into `a`."""
    argv = []
    for root in a.allowed_local_media_path:
        argv += ["--allowed-local-media-path", root]
    if a.allow_private_media_urls:
        argv.append("--allow-private-media-urls")
    if a.allowed_media_domains:
        argv += ["--allowed-media-domains", *a.allowed_media_domains]
    for name in ("max_media_bytes", "media_fetch_timeout", "max_media_redirects",
                 "max_image_pixels", "max_video_seconds", "default_video_fps",
                 "default_video_max_frames", "max_video_fps", "max_video_frames"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(a, name))]
    return argv
