"""Image description and visual question answering with the Python API.

    python examples/mllm_example.py --model QWEN2_VL_FOLDER_OR_REPO [path/to/image.jpg]

Without an image: text-only, through the same model.
"""

import argparse

from vllm_mlx.models import MLXVisionLanguageModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", nargs="?", help="an image file or URL")
    ap.add_argument("--model", default="mlx-community/Qwen2-VL-2B-Instruct-4bit")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    with MLXVisionLanguageModel(args.model) as mllm:
        if args.image is None:
            print("== text only (no image given)")
            print(mllm.generate("Say hello in three languages.",
                                max_tokens=args.max_tokens).text)
            return
        print("== describe_image")
        print(mllm.describe_image(args.image, max_tokens=args.max_tokens))
        print("\n== answer_about_image")
        print(mllm.answer_about_image(args.image, "What colours stand out?",
                                      max_tokens=args.max_tokens))
        print("\n== a custom prompt")
        print(mllm.generate("Write a one-line caption for this picture.", images=[args.image],
                            max_tokens=args.max_tokens).text)


if __name__ == "__main__":
    main()
