"""Text generation, streaming and chat with the Python API, in this process.

    python examples/simple_generate.py [--model NAME_OR_PATH] [--max-tokens N]

Without --model: the embedded default model (SmolLM2-135M-Instruct).
"""

import argparse

from vllm_mlx.models import MLXLanguageModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a folder, Hugging Face repo or .gguf file")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()

    with MLXLanguageModel(args.model) as model:
        print("== generate")
        out = model.generate("The capital of France is", max_tokens=args.max_tokens,
                             temperature=0)
        print(out.text, f"\n[{out.usage['completion_tokens']} tokens, {out.finish_reason}]")

        print("\n== stream_generate")
        for chunk in model.stream_generate("Tell me a story about a robot.",
                                           max_tokens=args.max_tokens, temperature=0.7):
            print(chunk.text, end="", flush=True)
        print()

        print("\n== chat")
        reply = model.chat([{"role": "system", "content": "You are a concise assistant."},
                            {"role": "user", "content": "What are the primary colors?"}],
                           max_tokens=args.max_tokens, temperature=0)
        print(reply.text)


if __name__ == "__main__":
    main()
