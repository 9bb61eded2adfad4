"""Prompt templates are data (finetune/data/templates/*.json). The template used in training is saved
into the adapter folder and read back by the predictor, so the two never drift apart."""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from .records import Record

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
ADAPTER_TEMPLATE_FILE = "prompt_template.json"
# Special names accepted wherever a template is chosen at prediction time.
AUTO = "auto"
RAW = "none"
# Templates can come with strangers' adapters: each text at most this long, with at most this many
# fields, so a template cannot multiply a prompt into megabytes before the length check.
MAX_TEMPLATE_CHARS = 16_384
MAX_TEMPLATE_FIELDS = 4


class TemplateError(UserError, ValueError):
    """Unknown template or a template that cannot render this record."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    description: str = ""
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    chat: bool = False

    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """The prompt for one instruction; the model continues it with the response."""
        if self.chat:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise TemplateError(
                    "the 'chat' template needs a tokenizer with a chat template; this base model has "
                    "none, so use prompt_template alpaca"
                )
            content = f"{instruction}\n\n{input}" if input else instruction
            return render_messages([{"role": "user", "content": content}], tokenizer)
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def get_response(self, output: str) -> str:
        """Strip an echoed prompt from decoded text (for callers that decode prompt + response)."""
        if self.response_split and self.response_split in output:
            return output.split(self.response_split, 1)[1].strip()
        return output.strip()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_messages(messages: list[dict[str, str]], tokenizer: Any) -> str:
    """Chat-template prompt ending with the assistant's turn header."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this base model's tokenizer has no chat template, so chat records cannot be used"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def auto_template(own: PromptTemplate | None, tokenizer: Any, fallback: str) -> PromptTemplate:
    """What `prompt_template=auto` means: the adapter's own template (what it was trained with);
    without one, the base model's chat template when its tokenizer has one, since an instruct model
    answers in its own format and ends its turn there (through Alpaca's it runs on into made-up
    "### Instruction:" turns); else `fallback` (the training default, Alpaca: LLaMA-era adapters')."""
    if own is not None:
        return own
    if getattr(tokenizer, "chat_template", None):
        return load_template("chat")
    return load_template(fallback)


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def load_template(name: str) -> PromptTemplate:
    """A packaged template by name, or a template JSON file by path."""
    path = Path(name)
    if path.suffix != ".json":
        path = TEMPLATES_DIR / f"{name}.json"
    if not path.is_file():
        raise TemplateError(
            f"unknown prompt template {name!r}; choose one of {', '.join(available_templates())}"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return template_from_dict(data, default_name=path.stem)


_FIELDS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}


def _check_fields(name: str, key: str, text: str) -> None:
    """Only bare {instruction} / {input} fields: templates can come from strangers' adapters, and
    str.format would otherwise honour width specs ({x:>4000000000}) and attribute access."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template {name!r}: {key} is over {MAX_TEMPLATE_CHARS} characters")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"template {name!r}: {key} is not a valid format string ({exc})") from None
    if sum(field is not None for _, field, _, _ in parts) > MAX_TEMPLATE_FIELDS:
        raise TemplateError(
            f"template {name!r}: {key} has more than {MAX_TEMPLATE_FIELDS} fields; "
            "use {instruction} and {input} once each"
        )
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in _FIELDS[key] or spec or conversion:
            allowed = ", ".join("{" + f + "}" for f in sorted(_FIELDS[key]))
            raise TemplateError(f"template {name!r}: {key} may only use {allowed}, found {{{field}}}")


def template_from_dict(data: dict[str, Any], default_name: str) -> PromptTemplate:
    if not isinstance(data, dict):
        raise TemplateError(f"template {default_name!r} must be a JSON object")
    known = {k: v for k, v in data.items() if k in PromptTemplate.__dataclass_fields__}
    known.setdefault("name", default_name)
    if not all(isinstance(v, bool if k == "chat" else str) for k, v in known.items()):
        raise TemplateError(f"template {str(known['name'])[:80]!r} has a field of the wrong type")
    for key in ("name", "description", "response_split"):
        if len(known.get(key, "")) > MAX_TEMPLATE_CHARS:
            raise TemplateError(
                f"template {known['name'][:80]!r}: {key} is over {MAX_TEMPLATE_CHARS} characters"
            )
    template = PromptTemplate(**known)
    if not template.chat:
        if "{instruction}" not in template.prompt_no_input:
            raise TemplateError(f"template {template.name!r} has no {{instruction}} field in prompt_no_input")
        for key in _FIELDS:
            _check_fields(template.name, key, getattr(template, key))
    return template


def save_template(template: PromptTemplate, adapter_dir: Path) -> Path:
    path = Path(adapter_dir) / ADAPTER_TEMPLATE_FILE
    path.write_text(json.dumps(template.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def split_record(record: Record, template: PromptTemplate, tokenizer: Any) -> tuple[str, str]:
    """(prompt, response) for one record; the loss covers the response (and the prompt only with
    train_on_inputs)."""
    if record.shape == "alpaca":
        return template.render(record.instruction, record.input, tokenizer), record.output
    if record.shape == "completion":
        return record.prompt, record.output
    if record.shape == "messages":
        history = [{"role": m.role, "content": m.content} for m in record.messages[:-1]]
        return render_messages(history, tokenizer), record.messages[-1].content
    return "", record.text
