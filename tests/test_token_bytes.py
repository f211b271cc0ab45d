from engine_worker.model import load_tokenizer, read_facts
from engine_worker.token_bytes import token_bytes
from vllm_mlx.v1 import engine_pb2 as pb

TEXT = "Café naïve 日本語 😀 — “quotes”, tabs\tand\nnewlines"


def test_token_bytes_rebuild_the_text_exactly(tiny_model):
    tok = load_tokenizer(read_facts(str(tiny_model)))
    ids = tok.encode(TEXT)
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    # Some tokens hold part of a character: their decoded text cannot say it.
    partial = [i for i, p in zip(ids, pieces) if tok.decode([i]) == "\ufffd"]
    assert partial and all(len(token_bytes(tok, i)) >= 1 for i in partial)


def test_logprobs_carry_raw_bytes_over_grpc(engine, tiny_model):
    tok = load_tokenizer(read_facts(str(tiny_model)))
    # The first byte of "日" alone: not a character by itself.
    byte_token = next(i for i in tok.encode("日") if token_bytes(tok, i) == "日".encode()[:1])
    rs = list(engine.stub.Generate(pb.GenerateRequest(
        text="x", max_tokens=2, ignore_eos=True, logprobs=True, top_logprobs=1,
        sampling=pb.SamplingParams(logit_bias={byte_token: 100.0})), timeout=30))
    lps = [lp for r in rs for lp in r.logprobs]
    assert [lp.token_id for lp in lps] == [byte_token] * 2
    assert all(lp.token_bytes == "日".encode()[:1] and lp.token == "\ufffd" for lp in lps)
    assert lps[0].top[0].token_bytes == "日".encode()[:1]
