"""Image understanding through the OpenAI SDK against a running server with a
vision-language model.

    vllm-mlx-up --model mlx-community/Qwen2-VL-2B-Instruct-4bit --port 8000 &
    python examples/demo_openai_image.py [--image-url URL] [--image FILE]

Without --image: a picture made on the spot, sent base64-encoded.
"""

import argparse
import base64
from pathlib import Path

from openai import OpenAI


def data_url(path: str | None) -> str:
    if path:
        data = Path(path).read_bytes()
    else:
        from vllm_mlx.bench.inputs import jpeg, photo_like

        data = jpeg(photo_like(320, 240, 7), 90)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", default="default")
    ap.add_argument("--image", help="an image file, sent base64-encoded")
    ap.add_argument("--image-url", help="an http(s) image URL for the server to fetch")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    url = args.image_url or data_url(args.image)
    print(f"== the image ({'URL' if args.image_url else 'base64'})")

    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": url}}]}]
    r = client.chat.completions.create(model=args.model, messages=messages,
                                       max_tokens=args.max_tokens)
    print(r.choices[0].message.content)

    print("\n== a follow-up question")
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "Which colour is most common in it?"}]
    r = client.chat.completions.create(model=args.model, messages=messages,
                                       max_tokens=args.max_tokens)
    print(r.choices[0].message.content)


if __name__ == "__main__":
    main()
