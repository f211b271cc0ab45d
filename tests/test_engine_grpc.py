"""A real engine process on a loopback port, driven by real gRPC clients."""

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from vllm_mlx.v1 import engine_pb2 as pb

from .conftest import ROOT, start_engine, wait_until

CHAT = pb.ChatInput(messages=[pb.ChatMessage(role="system", content="Be brief."),
                              pb.ChatMessage(role="user", content="Tell me about café culture.")])


def generate(stub, timeout=60, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=timeout))


def joined(responses) -> tuple[list[int], str]:
    return ([t for r in responses for t in r.token_ids], "".join(r.text for r in responses))


def stats(stub) -> pb.Stats:
    return stub.GetStats(pb.GetStatsRequest(), timeout=5)




def test_model_info(engine):
    info = engine.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert info.context_length == 2048 and info.has_chat_template
    assert list(info.modalities) == ["text"] and len(info.eos_token_ids) >= 1
    assert info.max_num_seqs == 8 and info.max_queue == 16


def test_stream_chat_text_and_token_ids(engine):
    rs = generate(engine.stub, chat=CHAT, max_tokens=16, ignore_eos=True)
    assert rs[-1].finished and rs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rs[-1].completion_tokens == 16 and rs[-1].prompt_tokens > 10
    ids, text = joined(rs)
    assert len(ids) == 16 and 1 < len(rs) <= 16, "streamed, tokens coalesce at most"
    assert text
    again = generate(engine.stub, text="hello world", max_tokens=8, ignore_eos=True)
    same = generate(engine.stub, text="hello world", max_tokens=8, ignore_eos=True)
    assert joined(again) == joined(same)


def test_concurrent_streams_match_solo(engine):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(12)]
    solo = [joined(generate(engine.stub, text=p, max_tokens=20, ignore_eos=True)) for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(
            lambda p: joined(generate(engine.stub, text=p, max_tokens=20, ignore_eos=True)),
            prompts))
    assert together == solo


def test_mid_decode_joins(engine):
    """Start a long request, then join others while it decodes."""
    long_stream = engine.stub.Generate(pb.GenerateRequest(
        text="a long one", max_tokens=300, ignore_eos=True), timeout=60)
    first = next(long_stream)
    assert not first.finished
    solo = joined(generate(engine.stub, text="short one", max_tokens=10, ignore_eos=True))
    results = []
    for _ in range(3):
        results.append(joined(generate(engine.stub, text="short one", max_tokens=10,
                                       ignore_eos=True)))
    rest = list(long_stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion_tokens == 300
    assert results == [solo] * 3


def test_abort_frees_the_slot(engine):
    stream = engine.stub.Generate(pb.GenerateRequest(
        request_id="to-abort", text="never ending", max_tokens=1500, ignore_eos=True), timeout=60)
    next(stream)
    assert wait_until(lambda: stats(engine.stub).running >= 1)
    assert engine.stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).found
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert rest[-1].completion_tokens < 1500
    assert wait_until(lambda: stats(engine.stub).running == 0)
    assert not engine.stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).found


def test_client_cancel_aborts(engine):
    stream = engine.stub.Generate(pb.GenerateRequest(
        text="cancel me", max_tokens=1500, ignore_eos=True), timeout=60)
    next(stream)
    assert wait_until(lambda: stats(engine.stub).running == 1)
    stream.cancel()
    assert wait_until(lambda: stats(engine.stub).running == 0), "cancel must stop the compute"


def test_queue_full_is_resource_exhausted(engine):
    """8 running + 16 waiting fit; the rest are refused at once."""
    def open_stream(i):
        # max_tokens 0: up to the context length, so the running ones hold
        # their slots however slowly the other streams get going.
        return engine.stub.Generate(pb.GenerateRequest(
            request_id=f"fill-{i}", text="fill", max_tokens=0, ignore_eos=True), timeout=60)

    def first_message(s):
        try:
            next(s)
            return "ok"
        except grpc.RpcError as e:
            return e.code()

    running = [open_stream(i) for i in range(8)]
    with ThreadPoolExecutor(30) as pool:
        assert list(pool.map(first_message, running)) == ["ok"] * 8
        rest = [open_stream(i) for i in range(8, 30)]
        answers = [pool.submit(first_message, s) for s in rest]
        # Waiting requests send nothing until admitted; refusals answer at once.
        assert wait_until(lambda: sum(a.done() for a in answers) >= 30 - 8 - 16)
        refused = [a.result() for a in answers if a.done()]
        assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused), refused
        assert stats(engine.stub).requests_rejected >= len(refused)
        for i in range(30):
            engine.stub.Abort(pb.AbortRequest(request_id=f"fill-{i}"), timeout=5)
    for s in running + rest:
        s.cancel()
    assert wait_until(lambda: stats(engine.stub).running == 0 and stats(engine.stub).waiting == 0)


def _error(stub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, **fields)
    return info.value


def test_context_overflow_names_both_numbers(engine):
    err = _error(engine.stub, token_ids=pb.TokenIds(ids=[5] * 100), max_tokens=2000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100" in err.details() and "2000" in err.details() and "2048" in err.details()
    err = _error(engine.stub, token_ids=pb.TokenIds(ids=[5] * 2048))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2048 tokens" in err.details() and "no room" in err.details()


@pytest.mark.parametrize("fields, needle", [
    (dict(), "one of text, token_ids or chat"),
    (dict(text=""), "empty"),
    (dict(token_ids=pb.TokenIds(ids=[1, 999999])), "999999"),
    (dict(text="x", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (dict(text="x", sampling=pb.SamplingParams(top_p=0)), "top_p"),
    (dict(text="x", sampling=pb.SamplingParams(logit_bias={100000: 1.0})), "logit_bias"),
    (dict(text="x", logprobs=True, top_logprobs=50), "top_logprobs"),
    (dict(text="x", stop=[""]), "stop"),
    (dict(chat=pb.ChatInput(messages=[pb.ChatMessage(role="wizard", content="x")])), "role"),
    (dict(chat=pb.ChatInput()), "messages"),
    (dict(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="x")],
                            template_kwargs_json="{not json")), "JSON"),
])
def test_malformed_requests_are_invalid_argument(engine, fields, needle):
    err = _error(engine.stub, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert needle in err.details()


def test_duplicate_request_id(engine):
    stream = engine.stub.Generate(pb.GenerateRequest(
        request_id="dup", text="x", max_tokens=500, ignore_eos=True), timeout=60)
    next(stream)
    err = _error(engine.stub, request_id="dup", text="y", max_tokens=5)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.cancel()


def test_stop_string_split_across_tokens_never_leaks(engine):
    _, text = joined(generate(engine.stub, text="stop test", max_tokens=40, ignore_eos=True))
    assert len(text) > 12
    stop = text[5:9]  # likely spans a token boundary; must not appear in the output
    rs = generate(engine.stub, text="stop test", max_tokens=40, ignore_eos=True, stop=[stop])
    _, got = joined(rs)
    assert got == text[: text.index(stop)]
    assert rs[-1].finish_reason == pb.FINISH_REASON_STOP and rs[-1].stop_reason == stop


def test_stop_token_ids(engine):
    ids, _ = joined(generate(engine.stub, text="stop ids", max_tokens=20, ignore_eos=True))
    target = ids[4]
    rs = generate(engine.stub, text="stop ids", max_tokens=20, ignore_eos=True,
                  stop_token_ids=[target])
    got, _ = joined(rs)
    assert got == ids[: ids.index(target) + 1]
    assert rs[-1].finish_reason == pb.FINISH_REASON_STOP


def test_logprobs(engine):
    rs = generate(engine.stub, text="logprobs", max_tokens=6, ignore_eos=True, logprobs=True,
                  top_logprobs=3)
    lps = [lp for r in rs for lp in r.logprobs]
    assert len(lps) == 6
    for lp in lps:
        assert len(lp.top) == 3 and lp.logprob <= 0
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].token_id == lp.token_id, "greedy picks the most likely token"
        assert abs(lp.top[0].logprob - lp.logprob) < 1e-5


def test_seeded_sampling_is_reproducible_over_grpc(engine):
    sampling = pb.SamplingParams(temperature=1.3, top_p=0.95, seed=1234)
    a = joined(generate(engine.stub, text="seed", max_tokens=16, ignore_eos=True,
                        sampling=sampling))
    b = joined(generate(engine.stub, text="seed", max_tokens=16, ignore_eos=True,
                        sampling=sampling))
    greedy = joined(generate(engine.stub, text="seed", max_tokens=16, ignore_eos=True))
    assert a == b and a != greedy


def test_top_k_past_the_vocabulary_keeps_every_token(engine):
    """top_k >= vocab size filters nothing: the same draws as no top_k at all
    (found by the gateway fuzz run: mlx-lm's top-k refused it mid-batch)."""
    def draw(**extra):
        sampling = pb.SamplingParams(temperature=1.0, seed=7, **extra)
        out = generate(engine.stub, text="k", max_tokens=8, ignore_eos=True, sampling=sampling)
        assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH, out[-1]
        return joined(out)

    assert draw(top_k=10**6) == draw()


def test_failure_in_one_request_leaves_the_batch_running(engine):
    with ThreadPoolExecutor(4) as pool:
        healthy = [pool.submit(generate, engine.stub, text=f"ok {i}", max_tokens=30,
                               ignore_eos=True) for i in range(3)]
        faulty = pool.submit(generate, engine.stub, request_id="fault-1", text="boom",
                             max_tokens=30, ignore_eos=True)
        bad = faulty.result()
        assert bad[-1].finish_reason == pb.FINISH_REASON_ERROR
        assert "injected fault" in bad[-1].error
        for f in healthy:
            rs = f.result()
            assert rs[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert rs[-1].completion_tokens == 30
    # The engine is still fine afterwards.
    assert generate(engine.stub, text="after", max_tokens=3)[-1].finished


def test_reflection_lists_services(engine):
    db = ProtoReflectionDescriptorDatabase(engine.channel)
    services = set(db.get_services())
    assert {"vllm_mlx.v1.Engine", "grpc.health.v1.Health"} <= services
    desc = db.FindFileContainingSymbol("vllm_mlx.v1.Engine")
    assert "Generate" in str(desc)


def test_client_with_only_the_proto_files(engine, tmp_path):
    """Stubs generated from proto/ alone, in a process that cannot import vllm_mlx."""
    from grpc_tools import protoc

    out = tmp_path / "stubs"
    out.mkdir()
    proto_dir = ROOT / "proto"
    protos = [str(p.relative_to(proto_dir)) for p in proto_dir.rglob("*.proto")]
    assert protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}",
                        f"--grpc_python_out={out}", *protos]) == 0
    for d in (out / "vllm_mlx", out / "vllm_mlx" / "v1"):
        (d / "__init__.py").touch()
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(out)!r})
        import grpc
        from vllm_mlx.v1 import engine_pb2 as pb, engine_pb2_grpc
        assert pb.__file__.startswith({str(out)!r}), pb.__file__
        stub = engine_pb2_grpc.EngineStub(grpc.insecure_channel({engine.address!r}))
        text = ""
        for r in stub.Generate(pb.GenerateRequest(text="hi", max_tokens=5, ignore_eos=True),
                               timeout=30):
            text += r.text
            last = r
        print(last.completion_tokens, last.finish_reason)
    """)
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", str(pb.FINISH_REASON_LENGTH)]


def test_load_failure_exits_with_a_message(tmp_path):
    with pytest.raises(RuntimeError) as info:
        start_engine(tmp_path / "no-such-model", tmp_path, timeout=60)
    assert "no-such-model" in str(info.value)


def test_health_is_not_serving_before_ready(tiny_model, tmp_path):
    """The engine listens at once but says SERVING only after warm-up."""
    e = start_engine(tiny_model, tmp_path)
    try:
        log = e.log()
        assert log.index("warm-up took") < log.index("serving ")
    finally:
        e.stop()
    assert e.proc.returncode == 0, "SIGTERM is a clean shutdown"

