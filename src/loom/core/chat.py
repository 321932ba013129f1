"""Chat templates: a conversation rendered to text exactly as `transformers`'
`apply_chat_template(..., tokenize=False)` does, so that a model fine-tuned here sees the same
text at inference in any runtime that uses the tokenizer's own template."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from tokenizers import Tokenizer

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.tokenizer import EOS

TemplateMode = Literal["auto", "chatml", "none"]
TEMPLATE_MODES: tuple[str, ...] = ("auto", "chatml", "none")
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# The special-token names transformers hands to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]

# Tool calls in the Hermes format (Qwen2.5's templates, NousResearch's Hermes models): the tools
# listed in the system prompt, each call the model makes one JSON object between these tags,
# each result sent back in a user turn between <tool_response> tags.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
HERMES_TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_PROBE_TOOL = "loom_probe_tool_7f3a"


class TemplateRejected(LoomError):
    """The template refused a conversation (its raise_exception): a problem of that record."""


def token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json of a tokenizer folder ({} when there is none)."""
    file = folder / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LoomError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise LoomError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return config


def _config_template(config: dict[str, Any], file: Path) -> str | None:
    """The `chat_template` of tokenizer_config.json: a string, or the "default" of a named list."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, dict) and isinstance(item.get("template"), str)
        }
        if "default" in named:
            return named["default"]
        raise LoomError(
            f"{file}: chat_template has templates named {sorted(map(str, named))} but none named "
            "'default'; add one, or set data.template=chatml to use the built-in ChatML template"
        )
    raise LoomError(
        f"{file}: chat_template must be a string or a list of {{name, template}}, "
        f"not {type(value).__name__}"
    )


def _compile(source: str, where: str) -> Any:
    """A Jinja2 template in the same sandbox, with the same helpers, as transformers uses."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson escapes HTML characters, which would change the rendered text.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LoomError(
            f"the chat template from {where} is not valid Jinja2 (line {e.lineno}: {e.message}); "
            "fix it, or set data.template=chatml to use the built-in ChatML template"
        ) from None


class ChatTemplate:
    """Renders conversations with a tokenizer's chat template, or passes raw text through
    (`source` None: mode "none", where prompt and completion are simply concatenated)."""

    def __init__(
        self,
        source: str | None,
        origin: str,
        special_tokens: dict[str, str] | None = None,
    ) -> None:
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        self._compiled = None if source is None else _compile(source, origin)

    @property
    def is_raw(self) -> bool:
        """True for mode "none": no template, text is prompt + completion."""
        return self.source is None

    @property
    def is_builtin_chatml(self) -> bool:
        return self.source == CHATML_TEMPLATE

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @classmethod
    def from_tokenizer_dir(cls, folder: str | Path, mode: str = "auto") -> ChatTemplate:
        """The template of a tokenizer folder ("auto": chat_template.jinja, else
        tokenizer_config.json's chat_template, else built-in ChatML with a warning), the built-in
        ChatML ("chatml"), or none ("none")."""
        if mode not in TEMPLATE_MODES:
            raise LoomError(f"data.template={mode!r} is not one of {', '.join(TEMPLATE_MODES)}")
        path = Path(folder)
        if not path.is_dir():
            raise LoomError(f"tokenizer folder {path} does not exist")
        config = read_tokenizer_config(path)
        special = {
            name: text
            for name in SPECIAL_TOKEN_NAMES
            if (text := token_text(config.get(name))) is not None
        }
        if mode == "none":
            return cls(None, "none (raw prompt + completion)", special)
        if mode == "chatml":
            return cls(CHATML_TEMPLATE, "built-in ChatML", special)
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():  # transformers gives the file priority over the config entry
            return cls(jinja_file.read_text(encoding="utf-8"), str(jinja_file), special)
        config_file = path / "tokenizer_config.json"
        source = _config_template(config, config_file)
        if source is not None:
            return cls(source, f"{config_file} chat_template", special)
        logger.warning(
            "the tokenizer in %s has no chat template (no chat_template.jinja, no chat_template "
            "in tokenizer_config.json): using the built-in ChatML template (fine-tuning: set "
            "data.template=chatml to choose it explicitly); add the model's own template to the "
            "tokenizer folder to use it instead",
            path,
        )
        return cls(CHATML_TEMPLATE, "built-in ChatML (fallback)", special)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The conversation as text, as transformers' apply_chat_template(tokenize=False)
        (`tools`, OpenAI's function definitions, reach the template as its `tools`)."""
        if self._compiled is None:
            raise LoomError(
                "data.template=none renders no conversations: give prompt/completion records, "
                "or use data.template=auto or chatml for chat records"
            )
        import jinja2

        try:
            return str(
                self._compiled.render(
                    **self.special_tokens,
                    messages=[dict(m) for m in messages],
                    tools=tools or None,
                    documents=None,
                    add_generation_prompt=add_generation_prompt,
                )
            )
        except jinja2.exceptions.TemplateError as e:
            raise TemplateRejected(
                f"the chat template from {self.origin} rejected it: {e}"
            ) from None

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the template writes the `tools` it is given into the prompt (Qwen2.5,
        Llama 3.1, Hermes ...): tried on a one-message conversation, since templates say so
        nowhere else."""
        if self._compiled is None:
            return False
        probe = [{"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {}}}]
        try:
            text = self.render([{"role": "user", "content": "x"}], True, probe)
        except Exception:  # a template that fails on tools does not render them
            return False
        return _PROBE_TOOL in text

    def render_with_tools(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool = False,
    ) -> str:
        """A conversation that may define tools, call them (assistant `tool_calls`) and answer
        them (role `tool`): with the template's own tool format when it has one, else in the
        Hermes format (`hermes_messages`), which any template can render."""
        if self.renders_tools:
            return self.render(messages, add_generation_prompt, tools)
        return self.render(hermes_messages(messages, tools), add_generation_prompt)


def hermes_tool_call(name: str, arguments: object) -> str:
    """One tool call as the model writes it in the Hermes format."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _hermes_call(call: Mapping[str, Any]) -> str:
    """An OpenAI tool call (arguments an object or a JSON string) as a <tool_call> block."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError, RecursionError):  # else written as it came
            arguments = json.loads(arguments)
    return hermes_tool_call(function.get("name", ""), arguments)


def hermes_messages(
    messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation with its tools written as plain text, for templates that know only
    system, user and assistant: the tools after the system prompt (a system message of their
    own when there is none), an assistant's `tool_calls` (OpenAI's shape; arguments an object
    or a JSON string) appended to its content as <tool_call> blocks, and consecutive `tool`
    messages merged into one user message of <tool_response> blocks, as Qwen2.5's template
    renders them."""
    out: list[dict[str, Any]] = []
    if tools:
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        block = HERMES_TOOLS_PROMPT.format(tools=listed)
        if messages and messages[0].get("role") == "system":
            first, *rest = messages
            out.append({**first, "content": f"{first.get('content') or ''}\n\n{block}"})
            messages = rest
        else:
            out.append({"role": "system", "content": block})
    previous = None
    for message in messages:
        role = message.get("role")
        content = message.get("content") or ""
        if role == "tool":
            response = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if previous == "tool":  # one user turn answers all the calls of the last turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
        elif role == "assistant" and message.get("tool_calls"):
            calls = [_hermes_call(call) for call in message["tool_calls"]]
            plain = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**plain, "content": "\n".join([content, *calls] if content else calls)})
        else:
            out.append(dict(message))
        previous = role
    return out


def stop_token_ids(tokenizer: Tokenizer, tokenizer_dir: Path, template: ChatTemplate) -> set[int]:
    """End of text as the model knows it: the tokenizer's eos token, the HF generation
    config's eos ids (what `transformers` stops on), and Loom's own end-of-text token."""
    ids: set[int] = set()
    for text in (template.eos_token, EOS):
        if text is not None and (i := tokenizer.token_to_id(text)) is not None:
            ids.add(i)
    generation = tokenizer_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids
