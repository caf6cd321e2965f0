"""The request side of the OpenAI chat-completions API, as bs-serve takes it.

A request is parsed from its raw bytes (so malformed JSON is our message, not a
framework's), validated by pydantic models that forbid unknown fields, and its
images are checked (count, encoded size, pixel count, format) before anything
is queued. Every fault is one :class:`ApiError`: an HTTP status and one line,
returned in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``.

Images come as ``image_url`` content parts: ``data:image/...;base64,...`` URLs,
or, only for directories given to ``bs-serve --allow-local-images DIR``, local
files (``file:///abs/path`` or an absolute path). Remote URLs are refused: the
server fetches nothing. Images are decoded in memory; nothing is written to disk.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """One client-visible fault: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_exceeded"
        if self.status == 404:
            return "not_found_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The fields bs-serve takes; any other is an error that names it. Decoding is greedy:
    ``temperature``, ``top_p`` and ``seed`` are accepted and do not change the answer."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    user: str | None = None
    # what clients often send with their defaults: taken at those values, refused otherwise
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do (None: all fine)."""
        if self.stop:
            return "stop: stop sequences are not supported; decoding ends at the model's end token or max_tokens"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return f"{name}: only 0 is supported (decoding is greedy)"
        if self.logprobs:
            return "logprobs: not supported"
        return None


_UNION = "list[tagged-union[TextPart,ImagePart]]"  # how pydantic names content's list branch in a loc


def _where(loc) -> str:
    """A field's path as clients wrote it: no union branch names, no discriminator tag."""
    loc = list(loc)
    if _UNION in loc:
        i = loc.index(_UNION)
        if len(loc) > i + 3 and loc[i + 2] in ("text", "image_url"):
            del loc[i + 2]
    return ".".join(str(p) for p in loc if p not in ("str", _UNION))


def validation_message(exc: ValidationError) -> tuple[str, str]:
    """The first error of a pydantic ValidationError as (one line, the field's path)."""
    # the deepest error: for ``content`` (a string or a list of parts) the one about the parts
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    where = _where(err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown field {where!r} (bs-serve takes the OpenAI chat-completions fields it documents)", where
    if err["type"] == "missing":
        return f"missing field {where!r}", where
    if err["type"] in ("string_type", "list_type") and err["loc"][-1] in ("str", _UNION):
        return f"{where}: must be a string or a list of content parts", where
    if err["type"] == "union_tag_invalid":
        return f"{where}: content part type {err['input'].get('type')!r} is not one of 'text', 'image_url'", where
    return f"{where}: {err['msg']}", where


def parse_request(raw: bytes) -> ChatRequest:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(doc).__name__}", code="invalid_json")
    try:
        req = ChatRequest.model_validate(doc)
    except ValidationError as exc:
        message, where = validation_message(exc)
        raise ApiError(400, message, param=where) from None
    fault = req.unsupported()
    if fault:
        raise ApiError(400, fault, param=fault.split(":")[0])
    return req


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    max_images: int = 8  # per request
    max_image_bytes: int = 8 * 1024 * 1024  # encoded size of one image
    max_image_pixels: int = 4096 * 4096  # width x height of one image, checked before decoding
    allow_local: tuple = ()  # directories local image paths may come from (none: refused)


@dataclasses.dataclass
class Conversation:
    """A request's messages as the chat template takes them, and its images in order."""

    messages: list[dict]  # [{"role", "content": str | [{"type": "text", "text"} | {"type": "image"}]}]
    images: list[bytes]  # encoded images, decoded in the worker (blindsight.serve.protocol.decode_image)


def conversation(req: ChatRequest, limits: ImageLimits) -> Conversation:
    messages, images = [], []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        parts = []
        for j, p in enumerate(m.content):
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
                continue
            where = f"messages.{i}.content.{j}.image_url"
            if m.role != "user":
                raise ApiError(400, f"{where}: images are taken in user messages only, not {m.role!r}", param=where)
            if len(images) == limits.max_images:
                raise ApiError(400, f"too many images: more than {limits.max_images} in one request "
                                    f"(bs-serve --max-images)", param=where, code="too_many_images")
            images.append(load_image_bytes(p.image_url.url, limits, where))
            parts.append({"type": "image"})
        messages.append({"role": m.role, "content": parts})
    return Conversation(messages, images)


def load_image_bytes(url: str, limits: ImageLimits, where: str) -> bytes:
    """The encoded bytes of one image part, its size and pixel count checked."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, f"{where}: a data URL must be data:image/<format>;base64,<data>", param=where)
        if len(payload) > (limits.max_image_bytes * 4) // 3 + 4:
            raise ApiError(413, f"{where}: the image is over {limits.max_image_bytes} bytes (bs-serve --max-image-bytes)",
                           param=where, code="image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data URL's payload is not valid base64", param=where) from None
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: remote image URLs are not fetched; send the image as a data URL", param=where)
    else:
        data = _local_image(url, limits, where)
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"{where}: the image is {len(data)} bytes, over {limits.max_image_bytes} "
                            f"(bs-serve --max-image-bytes)", param=where, code="image_too_large")
    check_image_header(data, limits, where)
    return data


def _local_image(url: str, limits: ImageLimits, where: str) -> bytes:
    path = url[len("file://"):] if url.startswith("file://") else url
    if not limits.allow_local:
        raise ApiError(400, f"{where}: local image paths are refused; send a data URL, or start bs-serve with "
                            f"--allow-local-images DIR", param=where)
    if not path.startswith("/"):
        raise ApiError(400, f"{where}: a local image path must be absolute (file:///abs/path)", param=where)
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(root).resolve()) for root in limits.allow_local):
        raise ApiError(403, f"{where}: {path} is outside the directories allowed by --allow-local-images", param=where)
    if not resolved.is_file():
        raise ApiError(400, f"{where}: no image file at {path}", param=where)
    size = resolved.stat().st_size
    if size > limits.max_image_bytes:
        raise ApiError(413, f"{where}: the image is {size} bytes, over {limits.max_image_bytes} (bs-serve --max-image-bytes)",
                       param=where, code="image_too_large")
    return resolved.read_bytes()


def check_image_header(data: bytes, limits: ImageLimits, where: str) -> None:
    """Format and size from the header alone (no pixels decoded yet)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{where}: the data is not an image that can be decoded ({_short(exc)})", param=where,
                       code="invalid_image") from None
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"{where}: the image is {w}x{h} pixels, over {limits.max_image_pixels} "
                            f"(bs-serve --max-image-pixels)", param=where, code="image_too_large")


def decode_image(data: bytes, index: int):
    """One RGB PIL image; a file whose header reads but whose pixels do not is a 400."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"image {index} cannot be decoded ({_short(exc)})", code="invalid_image") from None


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
