"""The usage block is read from streams and removed when the client did not ask for it."""

from __future__ import annotations

import json

from app.proxy.usage import UsageFilter, read_json_usage

CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
USAGE = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
DONE = b"data: [DONE]\n\n"


def relay(chunks: list[bytes], strip: bool) -> tuple[bytes, UsageFilter]:
    usage = UsageFilter(strip=strip)
    out = b"".join(usage.feed(chunk) for chunk in chunks) + usage.flush()
    return out, usage


def test_usage_is_read_and_kept_when_the_client_asked() -> None:
    out, usage = relay([CHUNK, CHUNK, USAGE, DONE], strip=False)
    assert out == CHUNK + CHUNK + USAGE + DONE
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)


def test_usage_event_is_removed_when_the_client_did_not_ask() -> None:
    out, usage = relay([CHUNK, USAGE, DONE], strip=True)
    assert out == CHUNK + DONE
    assert usage.completion_tokens == 3


def test_usage_event_split_across_reads_and_merged_with_neighbours() -> None:
    stream = CHUNK + USAGE + DONE
    for cut in range(1, len(stream)):
        out, usage = relay([stream[:cut], stream[cut:]], strip=True)
        assert out == CHUNK + DONE, cut
        assert usage.completion_tokens == 3


def test_content_that_mentions_usage_is_untouched() -> None:
    text = json.dumps({"choices": [{"delta": {"content": '"usage":{ is just text'}}]}).encode()
    chunk = b"data: " + text + b"\n\n"
    out, usage = relay([chunk, DONE], strip=True)
    assert out == chunk + DONE
    assert usage.completion_tokens is None


def test_non_streaming_usage() -> None:
    body = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9}}).encode()
    assert read_json_usage(body) == (4, 9)
    assert read_json_usage(b'{"object":"list"}') == (None, None)


def test_usage_written_with_spaces_is_read_and_removed() -> None:
    """Engines behind ENGINE_URL may write JSON with spaces; the block is found all the same."""
    spaced = b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
    out, usage = relay([CHUNK, spaced, DONE], strip=True)
    assert out == CHUNK + DONE
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)


def test_per_chunk_usage_is_kept_when_asked_for_and_the_last_counts() -> None:
    first = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}\n\n'
    second = b'data: {"choices":[{"delta":{"content":"b"}}],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
    out, usage = relay([first + second, DONE], strip=False)
    assert out == first + second + DONE
    assert usage.completion_tokens == 2


def test_only_the_usage_event_of_a_whole_answer_in_one_read_is_removed() -> None:
    whole = CHUNK * 64 + USAGE + DONE

    kept, kept_usage = relay([whole], strip=False)
    stripped, stripped_usage = relay([whole], strip=True)

    assert kept == whole and stripped == CHUNK * 64 + DONE
    assert (kept_usage.completion_tokens, stripped_usage.completion_tokens) == (3, 3)


def test_non_streaming_usage_whatever_follows_it() -> None:
    later = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 9},
             "prompt_logprobs": [{"7": {"decoded_token": "usage"}}], "kv_transfer_params": None}
    assert read_json_usage(json.dumps(later).encode()) == (4, 9)
    assert read_json_usage(json.dumps(later, indent=2).encode()) == (4, 9)
    assert read_json_usage(b'{"choices":[],"usage":null}') == (None, None)
    assert read_json_usage(b'{"usage":{"prompt_tokens":1') == (None, None)  # cut short


def test_responses_and_anthropic_usage_is_counted_and_kept() -> None:
    """Responses and Anthropic Messages name their counts input_tokens / output_tokens, in other places."""
    responses = b'data: {"type":"response.completed","response":{"usage":{"input_tokens":9,"output_tokens":4}}}\n\n'
    out, usage = relay([CHUNK, responses, DONE], strip=True)
    assert out == CHUNK + responses + DONE, "not the wrapper's own usage event: kept"
    assert (usage.prompt_tokens, usage.completion_tokens) == (9, 4)

    start = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
    delta = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":5}}\n\n'
    _, usage = relay([start, CHUNK, delta], strip=False)
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 5)
    assert read_json_usage(b'{"usage":{"input_tokens":3,"output_tokens":2}}') == (3, 2)
    assert read_json_usage(b'{"data":[],"usage":{"prompt_tokens":6,"total_tokens":6}}') == (6, None)
