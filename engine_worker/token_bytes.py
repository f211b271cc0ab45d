"""The raw bytes of one token, which its decoded text cannot give for a token
that holds part of a UTF-8 character (decoding alone yields U+FFFD). OpenAI's
logprobs carry these bytes so that clients can rebuild the text exactly."""

import re
from functools import lru_cache

_SPM_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE (GPT-2 and its descendants) spells each byte as one
    printable character: printable Latin-1 bytes as themselves, the rest
    shifted to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, shifted = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def token_bytes(tokenizer, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return b""
    if m := _SPM_BYTE.match(piece):  # SentencePiece byte fallback
        return bytes([int(m.group(1), 16)])
    table = _gpt2_unicode_to_byte()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if piece.startswith("\u2581"):  # SentencePiece word start
        return (" " + piece[1:]).encode()
    return tokenizer.decode([token_id]).encode()
