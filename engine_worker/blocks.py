"""How the prefix cache and the admission policy name a prompt's prefixes:
by 16-token blocks, as vLLM names its KV blocks. Each block-aligned prefix
has a key, a hash of the previous key and the block, so equal keys mean
equal prefixes (up to hash collisions, which the cache rules out by
comparing tokens). No MLX here: the admission policy uses the keys too.

A prompt's images and videos are placeholder tokens, the same for every
picture of a size, so token ids alone cannot tell two pictures apart: each
item's content hash (the media worker's) goes into the key of the block
where its tokens start, as vLLM mixes its multimodal hashes into its block
hashes. Prompts with the same tokens but another picture part from there on.
"""

from collections.abc import Container, Sequence

BLOCK_TOKENS = 16

# (start, end, content hash) of one image or video: its tokens are prompt[start:end].
MediaSpan = tuple[int, int, str]


def block_keys(tokens: list[int], media: Sequence[MediaSpan] = ()) -> list[int]:
    """The key of each block-aligned prefix of `tokens`, shortest first;
    `media`: the spans of the items among them."""
    starts = sorted((start, content) for start, _, content in media)
    keys, key, k = [], 0, 0
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        first = k
        while k < len(starts) and starts[k][0] < end:
            k += 1
        key = hash((key, *tokens[end - BLOCK_TOKENS:end],
                    *(content for _, content in starts[first:k])))
        keys.append(key)
    return keys


def media_end(media: Sequence[MediaSpan]) -> int:
    """Where the last item's tokens end (0: no media)."""
    return max((end for _, end, _ in media), default=0)


def shared_blocks(keys: list[int], known: Container[int]) -> int:
    """How many leading blocks of a prompt (its `keys`) some prefix in
    `known` covers: the deepest of its keys found there, plus one."""
    for i in range(len(keys) - 1, -1, -1):
        if keys[i] in known:
            return i + 1
    return 0
