"""Video understanding through the OpenAI SDK against a running server with a
vision-language model.

    vllm-mlx-up --model mlx-community/Qwen2-VL-2B-Instruct-4bit --port 8000 &
    python examples/demo_openai_video.py [--video-url URL] [--video FILE]

Without --video: a short clip made on the spot, sent base64-encoded.
"""

import argparse
import base64
from pathlib import Path

from openai import OpenAI


def data_url(path: str | None) -> str:
    if path:
        data = Path(path).read_bytes()
    else:
        from vllm_mlx.bench.inputs import encode_clip

        data = encode_clip(4, 8, 160, 120)
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", default="default")
    ap.add_argument("--video", help="a video file, sent base64-encoded")
    ap.add_argument("--video-url", help="an http(s) video URL for the server to fetch")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    url = args.video_url or data_url(args.video)
    # Frames sampled per second and their cap: vllm-mlx's request fields.
    sampling = {"video_fps": 2.0, "video_max_frames": 8}

    print("== describe the video")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Describe this video."},
        {"type": "video_url", "video_url": {"url": url}}]}]
    r = client.chat.completions.create(model=args.model, messages=messages,
                                       max_tokens=args.max_tokens, extra_body=sampling)
    print(r.choices[0].message.content)

    print("\n== a specific question, then a follow-up")
    messages[0]["content"][0]["text"] = "What moves in this video?"
    r = client.chat.completions.create(model=args.model, messages=messages,
                                       max_tokens=args.max_tokens, extra_body=sampling)
    print(r.choices[0].message.content)
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "And in which direction?"}]
    r = client.chat.completions.create(model=args.model, messages=messages,
                                       max_tokens=args.max_tokens, extra_body=sampling)
    print(r.choices[0].message.content)


if __name__ == "__main__":
    main()
