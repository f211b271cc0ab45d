"""How the prefix cache and the admission policy name a prompt's prefixes:
by 16-token blocks, as vLLM names its KV blocks. Each block-aligned prefix
has a key, a hash of the previous key and the block, so equal keys mean
equal prefixes (up to hash collisions, which the cache rules out by
comparing tokens). No MLX here: the admission policy uses the keys too.

Media requests have no keys today (they neither use nor feed the cache); a
key chain seeded with their media's content hashes would let them in.
"""

from collections.abc import Container

BLOCK_TOKENS = 16


def block_keys(tokens: list[int], seed: int = 0) -> list[int]:
    """The key of each block-aligned prefix of `tokens`, shortest first."""
    keys, key = [], seed
    for end in range(BLOCK_TOKENS, len(tokens) + 1, BLOCK_TOKENS):
        key = hash((key, *tokens[end - BLOCK_TOKENS:end]))
        keys.append(key)
    return keys


def shared_blocks(keys: list[int], known: Container[int]) -> int:
    """How many leading blocks of a prompt (its `keys`) some prefix in
    `known` covers: the deepest of its keys found there, plus one."""
    for i in range(len(keys) - 1, -1, -1):
        if keys[i] in known:
            return i + 1
    return 0
