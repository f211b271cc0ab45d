"""OpenAI requests into engine GenerateRequests.

The engine owns chat templates, tokenization and detokenization, so a chat
request travels as a ChatInput and a completion prompt as text or token ids:
direct gRPC clients need all three in the engine anyway, stop strings must be
matched where tokens become text to stop the compute in the same step, and a
gateway without a tokenizer starts in a second and stays small in each of its
N processes.
"""

import json

from gateway.chat_messages import (
    AssistantMessage,
    FilePart,
    ImagePathPart,
    ImageURLPart,
    InputAudioPart,
    Message,
    RefusalPart,
    TextPart,
    ToolMessage,
    VideoPathPart,
    VideoURLPart,
)
from gateway.errors import InvalidRequest
from gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    SamplingFields,
)
from vllm_mlx.v1 import engine_pb2 as pb
from vllm_mlx.v1 import media_pb2

U64 = 2**64
# Part types that need a modality, by the word the engine's ModelInfo uses.
_MEDIA = {ImageURLPart: ("image", "images"), VideoURLPart: ("video", "videos"),
          ImagePathPart: ("image", "images"), VideoPathPart: ("video", "videos"),
          InputAudioPart: ("audio", "audio"), FilePart: ("file", "files")}
# OpenAI's default when temperature is left out is sampling at 1.0, not
# greedy decoding (the engine's default for an unset field).
DEFAULT_TEMPERATURE = 1.0


def sampling(req: SamplingFields, choice: int) -> pb.SamplingParams:
    p = pb.SamplingParams(
        temperature=DEFAULT_TEMPERATURE if req.temperature is None else req.temperature)
    for name in ("top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            setattr(p, name, value)
    if req.top_k is not None and req.top_k > 0:  # -1 (vLLM) and 0 both disable it
        p.top_k = req.top_k
    if req.seed is not None:
        # Each of n choices gets its own seed, or they would all be the same.
        p.seed = (req.seed + choice) % U64
    for token, bias in (req.logit_bias or {}).items():
        p.logit_bias[int(token)] = bias
    return p


def _common(req: SamplingFields, request_id: str, choice: int, max_tokens: int | None,
            logprobs: bool, top_logprobs: int, prompt_logprobs: int | None = None
            ) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id, sampling=sampling(req, choice), max_tokens=max_tokens or 0,
        stop=req.stop_list, stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
        include_stop_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        prompt_logprobs=req.prompt_logprobs if prompt_logprobs is None else prompt_logprobs)


def request_ids(base: str, count: int) -> list[str]:
    return [base] if count == 1 else [f"{base}-{i}" for i in range(count)]


def _check_size(req: SamplingFields, prompts: int, max_choices: int) -> None:
    if req.n * prompts > max_choices:
        raise InvalidRequest(f"n ({req.n}) x prompts ({prompts}) is more than the "
                             f"{max_choices} choices one request may ask for", param="n")


# -- chat --------------------------------------------------------------------------

# Protobuf copies a message wherever one is assigned or appended, and a data:
# URL is megabytes: the chat is built in place, inside the request it goes
# out in, so the gateway's event loop (which streams every other request's
# tokens) copies it once, not four times.

def _fill_source(part, req: ChatCompletionRequest, src: media_pb2.MediaSource) -> bool:
    """An image or video part as the engine's MediaSource; False for other kinds."""
    if isinstance(part, ImageURLPart):
        src.kind, src.url = media_pb2.MEDIA_KIND_IMAGE, part.image_url.url
    elif isinstance(part, ImagePathPart):
        src.kind, src.path = media_pb2.MEDIA_KIND_IMAGE, part.image
    elif isinstance(part, (VideoURLPart, VideoPathPart)):
        src.kind = media_pb2.MEDIA_KIND_VIDEO
        src.fps, src.max_frames = req.video_fps or 0, req.video_max_frames or 0
        if isinstance(part, VideoURLPart):
            src.url = part.video_url.url
        else:
            src.path = part.video
    else:
        return False
    return True


def _fill_content(msg: pb.ChatMessage, message: Message, index: int,
                  req: ChatCompletionRequest, modalities: list[str]) -> None:
    """Plain text goes in `content`; a message with images or videos goes in
    `parts`, text and media in their order, for the engine's media workers."""
    content = message.content
    if content is None:
        return
    if isinstance(content, str):
        msg.content = content
        return
    if all(isinstance(part, (TextPart, RefusalPart)) for part in content):
        # Several text parts read as separate paragraphs, as vLLM joins them.
        msg.content = "\n".join(part.text if isinstance(part, TextPart) else part.refusal
                                for part in content)
        return
    for j, part in enumerate(content):
        if isinstance(part, TextPart):
            msg.parts.add(text=part.text)
            continue
        if isinstance(part, RefusalPart):
            msg.parts.add(text=part.refusal)
            continue
        modality, plural = _MEDIA[type(part)]
        where = f"messages[{index}].content[{j}]"
        if modality not in modalities:
            raise InvalidRequest(f"this model does not accept {plural}", param=where,
                                 code="unsupported_content")
        if not _fill_source(part, req, msg.parts.add().media):
            raise InvalidRequest(f"{plural} are not supported by this server yet",
                                 param=where, code="unsupported_content")


def fill_chat(chat: pb.ChatInput, req: ChatCompletionRequest, modalities: list[str]) -> None:
    """The request's messages, template options and tools, written into `chat`."""
    for i, m in enumerate(req.messages):
        msg = chat.messages.add(role=m.role)
        _fill_content(msg, m, i, req, modalities)
        if getattr(m, "name", None):
            msg.name = m.name
        if isinstance(m, ToolMessage):
            msg.tool_call_id = m.tool_call_id
        if isinstance(m, AssistantMessage):
            if m.refusal and not msg.content:
                msg.content = m.refusal
            msg.tool_calls.extend(pb.ToolCall(id=c.id, name=c.function.name,
                                              arguments=c.function.arguments)
                                  for c in m.tool_calls or [])
    if req.continue_final_message and req.messages[-1].role != "assistant":
        raise InvalidRequest("continue_final_message needs an assistant message last",
                             param="continue_final_message")
    chat.add_generation_prompt = not req.continue_final_message
    chat.continue_final_message = req.continue_final_message
    if req.chat_template_kwargs:
        chat.template_kwargs_json = json.dumps(req.chat_template_kwargs)
    if req.tools:
        chat.tools_json = json.dumps([t.model_dump(exclude_none=True) for t in req.tools])
        chat.tool_choice.CopyFrom(_tool_choice(req.tool_choice))
    if req.parallel_tool_calls is not None:
        chat.parallel_tool_calls = req.parallel_tool_calls


def _tool_choice(choice) -> pb.ToolChoice:
    if isinstance(choice, NamedToolChoice):
        return pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function=choice.function.name)
    modes = {None: pb.ToolChoice.MODE_AUTO, "auto": pb.ToolChoice.MODE_AUTO,
             "none": pb.ToolChoice.MODE_NONE, "required": pb.ToolChoice.MODE_REQUIRED}
    return pb.ToolChoice(mode=modes[choice])


def structured_output(req: ChatCompletionRequest) -> pb.StructuredOutput | None:
    """response_format (OpenAI's) or structured_outputs (vLLM's) as the
    engine's StructuredOutput; None for plain text."""
    fmt, so = req.response_format, req.structured_outputs
    if fmt is not None and fmt.type == "json_object":
        return pb.StructuredOutput(json_object=True)
    if fmt is not None and fmt.type == "json_schema":
        return pb.StructuredOutput(json_schema=json.dumps(fmt.json_schema.schema_))
    if so is None:
        return None
    if so.json_ is not None:
        return pb.StructuredOutput(json_schema=json.dumps(so.json_))
    if so.regex is not None:
        return pb.StructuredOutput(regex=so.regex)
    if so.choice is not None:
        return pb.StructuredOutput(choice=pb.Choice(options=so.choice))
    return pb.StructuredOutput(grammar=so.grammar)


def chat_requests(req: ChatCompletionRequest, request_id: str, modalities: list[str],
                  max_choices: int) -> list[pb.GenerateRequest]:
    _check_size(req, 1, max_choices)
    try:
        constraint = structured_output(req)
        out = []
        for i, rid in enumerate(request_ids(request_id, req.n)):
            g = _common(req, rid, i, req.max_completion_tokens or req.max_tokens,
                        req.logprobs, req.top_logprobs or 0)
            if out:
                g.chat.CopyFrom(out[0].chat)
            else:
                fill_chat(g.chat, req, modalities)
            if constraint is not None:
                g.structured_output.CopyFrom(constraint)
            out.append(g)
        return out
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"the request holds text that is not valid Unicode: {e}") from None


# -- completions -------------------------------------------------------------------

def completion_requests(req: CompletionRequest, request_id: str, max_choices: int
                        ) -> list[tuple[int, pb.GenerateRequest]]:
    """(prompt index, request) for each choice, in choice-index order."""
    prompts = req.prompts
    _check_size(req, len(prompts), max_choices)
    # Echo with logprobs scores the echoed prompt too, as OpenAI does (what
    # evaluation harnesses rely on), with as many alternatives.
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(req.logprobs, prompt_logprobs or 0)
    ids = request_ids(request_id, len(prompts) * req.n)
    out = []
    try:
        for k, rid in enumerate(ids):
            p, i = divmod(k, req.n)
            g = _common(req, rid, i, req.max_tokens, req.logprobs is not None,
                        req.logprobs or 0, prompt_logprobs)
            if isinstance(prompts[p], str):
                g.text = prompts[p]
            else:
                g.token_ids.ids.extend(prompts[p])
                g.echo = req.echo  # the engine turns the ids back into text
            out.append((p, g))
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"the request holds text that is not valid Unicode: {e}") from None
    return out
