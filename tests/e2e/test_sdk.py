"""The official OpenAI Python SDK driving sluice, as a user's application would."""

import openai
import pytest

from conftest import GATEWAY_KEY, UPSTREAM_KEY


def test_chat_plain_reaches_the_upstream_with_the_real_key(client, mock):
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content.startswith("word0 word1")
    assert reply.usage.total_tokens > 0
    seen = mock.last()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert GATEWAY_KEY not in str(seen)


def test_chat_streaming_reassembles_the_reply(client):
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "".join(f"word{i} " for i in range(8))


def test_chat_n_greater_than_one(client):
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]


def test_tools_and_streamed_tool_calls(client):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    reply = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "find it"}], tools=tools
    )
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == '{"query":"mock"}'
    assert reply.choices[0].finish_reason == "tool_calls"

    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "find it"}], tools=tools, stream=True
    )
    name, arguments = None, ""
    for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name = delta_call.function.name or name
            arguments += delta_call.function.arguments or ""
    assert (name, arguments) == ("lookup", '{"query":"mock"}')


def test_embeddings_float_and_base64(client):
    reply = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(reply.data) == 2
    assert len(reply.data[0].embedding) == 8
    assert all(-1.0 <= x <= 1.0 for x in reply.data[0].embedding)
    floats = client.embeddings.create(model="text-embedding-3-small", input="a", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding)


def test_completions_legacy(client):
    reply = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    assert reply.choices[0].text.startswith("word0")


def test_speech_is_binary(client):
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    data = audio.read()
    assert data.startswith(b"ID3")
    assert len(data) == 10 + 32 * 1024
    assert data[10:20] == bytes((i * 7) % 256 for i in range(10))


def test_transcription_is_multipart(client, tmp_path):
    sample = tmp_path / "sample.wav"
    sample.write_bytes(b"RIFF" + bytes(range(256)) * 8)
    with sample.open("rb") as f:
        result = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert result.text == f"mock transcription of sample.wav ({4 + 256 * 8} bytes)"


def test_file_upload_list_retrieve_content_delete(client, tmp_path):
    lines = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 50
    path = tmp_path / "batch.jsonl"
    path.write_bytes(lines)
    with path.open("rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.bytes == len(lines)
    assert created.filename == "batch.jsonl"
    assert created.id in [f.id for f in client.files.list()]
    assert client.files.retrieve(created.id).purpose == "batch"
    assert client.files.content(created.id).read() == lines
    batch = client.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.retrieve(batch.id).input_file_id == created.id
    assert client.files.delete(created.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_models_images_moderations(client):
    assert "gpt-4o" in [m.id for m in client.models.list()]
    assert client.images.generate(model="dall-e-3", prompt="a cat").data[0].url.endswith(".png")
    assert client.moderations.create(input="hello").results[0].flagged is False


def test_responses_plain_and_streaming(client):
    response = client.responses.create(model="gpt-4o", input="hello")
    assert response.output_text == "".join(f"word{i} " for i in range(8))
    deltas = []
    completed = None
    with client.responses.stream(model="gpt-4o", input="hello") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
    assert "".join(deltas) == response.output_text
    assert completed is not None and completed.status == "completed"


def test_wrong_or_missing_key_is_401(gateway, mock):
    before = len(mock.requests())
    wrong = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert len(mock.requests()) == before


def test_oversized_request_is_413(client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input="x" * 100_000)
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large"


def test_sdk_requests_are_logged_with_their_tokens(client, gateway):
    import json
    import time
    import urllib.request

    plain = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "count me"}])
    stream = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "count me"}], stream=True
    )
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks), "no usage chunk the client did not ask for"
    # No admin key is configured, so the admin API answers loopback clients.
    url = f"http://{gateway.address}/api/requests?search=count%20me"
    for _ in range(100):
        with urllib.request.urlopen(url) as response:
            rows = json.load(response)["data"]
        if len(rows) == 2:
            break
        time.sleep(0.05)
    assert len(rows) == 2
    assert {row["stream"] for row in rows} == {True, False}
    assert all(row["total_tokens"] == plain.usage.total_tokens for row in rows)
