"""The export's tokenizer and chat template without transformers.

Reads what a Hugging Face checkpoint (and so a bs-export directory) holds:
``tokenizer.json`` through the ``tokenizers`` library (the Rust tokenizer that
transformers' fast tokenizers wrap), ``tokenizer_config.json`` for the special
tokens and BOS/EOS handling, and the chat template from ``chat_template.jinja``
(or ``chat_templates/default.jinja``, or ``tokenizer_config.json``'s
``chat_template``), in the order transformers' ``AutoTokenizer`` looks.

The template is rendered as ``apply_chat_template(..., tokenize=False)`` does
(``transformers.utils.chat_template_utils``): jinja2's immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, a
pass-through ``{% generation %}`` block, the ``tojson`` / ``raise_exception`` /
``strftime_now`` / ``dict`` / ``namespace`` helpers, and the variables
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and every
named special token (``bos_token``, ``eos_token``, ... and the model's own,
e.g. ``image_token``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from blindsight.errors import BlindSightError

# transformers' named special tokens (SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES)
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUPS = (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), \
    (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BlindSightError(f"{path} cannot be read as JSON ({exc})") from None


def load_chat_template(directory: Path, config: dict) -> str | None:
    """The tokenizer's chat template, looked up as transformers' tokenizer does."""
    for path in (directory / "chat_template.jinja", directory / "chat_templates" / "default.jinja"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _compile_template(source: str):
    """The template in the sandboxed environment transformers renders chat templates with."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-token tracking in transformers): the body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        """A namespace that refuses underscore names (no reaching into CPython internals)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise BlindSightError(f"the chat template does not parse ({exc})") from None


class Tokenizer:
    """What bs-run needs of a transformers tokenizer: encode, decode, tokens by id, the chat template."""

    def __init__(self, directory):
        from tokenizers import AddedToken, Tokenizer as RustTokenizer, processors

        self.directory = Path(directory)
        path = self.directory / "tokenizer.json"
        if not path.is_file():
            raise BlindSightError(f"{self.directory} has no tokenizer.json; the runtime reads the tokenizer from it "
                                  f"(copy it from the checkpoint, or run bs-export again)")
        self._tok = RustTokenizer.from_file(str(path))
        cfg_path = self.directory / "tokenizer_config.json"
        config = _read_json(cfg_path) if cfg_path.is_file() else {}
        # every named special token, the model's own (image_token, boi_token, ...) included
        self.special_tokens = {k: t for k, v in config.items()
                               if (k in NAMED_SPECIAL or k.endswith("_token")) and (t := _token_text(v)) is not None}
        extra = [t for v in config.get("extra_special_tokens") or [] if (t := _token_text(v)) is not None]
        missing = [t for t in [*self.special_tokens.values(), *extra] if self._tok.token_to_id(t) is None]
        if missing:  # transformers adds named special tokens the vocabulary lacks
            self._tok.add_special_tokens([AddedToken(t, special=True) for t in missing])
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        if "add_bos_token" in config or "add_eos_token" in config or self._tok.post_processor is None:
            # transformers rebuilds the post-processor from add_bos_token / add_eos_token
            add_bos, add_eos = add_bos and self.bos_token is not None, add_eos and self.eos_token is not None
            single = f"{self.bos_token + ':0 ' if add_bos else ''}$A:0{' ' + self.eos_token + ':0' if add_eos else ''}"
            pair = f"{single}{' ' + self.bos_token + ':1' if add_bos else ''} $B:1{' ' + self.eos_token + ':1' if add_eos else ''}"
            specials = [(t, self._tok.token_to_id(t)) for t, on in ((self.bos_token, add_bos), (self.eos_token, add_eos)) if on]
            self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = load_chat_template(self.directory, config)
        self._compiled = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def convert_ids_to_tokens(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise BlindSightError(f"token id {token_id} is outside the tokenizer's vocabulary "
                                  f"({self._tok.get_vocab_size()} tokens); template.json and tokenizer.json disagree")
        return token

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The rendered conversation (transformers' ``apply_chat_template(..., tokenize=False)``)."""
        if self.chat_template is None:
            raise BlindSightError(f"{self.directory} has no chat template")
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **kwargs}
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **variables)
