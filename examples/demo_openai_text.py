"""Text chat through the OpenAI SDK against a running server.

    vllm-mlx --port 8000 &          # or: vllm-mlx-up --model M --port 8000
    python examples/demo_openai_text.py [--base-url http://localhost:8000/v1] [--model default]
"""

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", default="default")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="not-needed")
    ask = dict(model=args.model, max_tokens=args.max_tokens)

    print("== a simple completion")
    r = client.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, **ask)
    print(r.choices[0].message.content)

    print("\n== a system message")
    r = client.chat.completions.create(messages=[
        {"role": "system", "content": "You answer like a pirate."},
        {"role": "user", "content": "How is the weather?"}], **ask)
    print(r.choices[0].message.content)

    print("\n== streaming")
    for chunk in client.chat.completions.create(
            messages=[{"role": "user", "content": "Count from one to ten."}],
            stream=True, **ask):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    print("\n== a multi-turn conversation")
    messages = [{"role": "user", "content": "My name is Ada."}]
    r = client.chat.completions.create(messages=messages, temperature=0, **ask)
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "What is my name?"}]
    r = client.chat.completions.create(messages=messages, temperature=0, **ask)
    print(r.choices[0].message.content)

    print("\n== temperature")
    for t in (0.0, 1.0):
        r = client.chat.completions.create(
            messages=[{"role": "user", "content": "Name a fruit."}], temperature=t, **ask)
        print(f"temperature {t}: {r.choices[0].message.content}")


if __name__ == "__main__":
    main()
