"""Chat formats at inference (docs/chat.md#formats): the token ids of a conversation about a document, in pieces
that can be fed to the model one after another (document first, then each turn).

A format is one of the tokenizer's named chat templates (tokenizer.CHAT_TEMPLATES) or `none`, plain continuation.
With a template, the document goes right after the BOS and the system text (where the instruct demo put the text
it was asked about) and the turns follow as the template renders them; every template segment is tokenized on its
own, as LongLlamaTokenizer.apply_chat_template does. With `none`, the document follows BOS and each question is
appended as it is, for base models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from longllama.errors import InputError
from longllama.tokenizer import _SEGMENT_MARK, _SEGMENT_VAR, _SPECIAL_MARK, _SPECIAL_VAR, CHAT_SYSTEM_PROMPT

PLAIN = "none"
DEFAULT_TEMPLATE = "default"
# Placeholders substituted after rendering, so the pieces of the format can be found in the rendered text.
_SYSTEM_SLOT, _USER_SLOT, _ANSWER_SLOT, _NEXT_SLOT = (f"\x00\x1dslot-{i}\x1d\x00" for i in range(4))
# The system text a template uses when the conversation has none (the fine-tuning templates' own).
_DEFAULT_SYSTEM = {DEFAULT_TEMPLATE: CHAT_SYSTEM_PROMPT, "openorca-3b": ""}
# Text that starts the next user turn: generation stops there (beside EOS).
_STOP_STRINGS = {DEFAULT_TEMPLATE: ("\nUSER:",), PLAIN: ("\n",)}


@dataclass(frozen=True)
class ChatFormat:
    """How one model's conversations about a document are laid out in tokens.

    `prefix_ids` come before the document, `document_ids(text)` is the document, `turn_ids(question, first=...)`
    a user turn up to where the answer starts, `end_ids` what closes an answer (EOS for the chat template), and
    `stop_strings` end an answer besides EOS."""

    template: str
    system: str | None
    prefix_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    single_turn: bool
    _tokenizer: Any = field(repr=False, compare=False)
    _first_turn: str = field(repr=False, compare=False)
    _next_turn: str | None = field(repr=False, compare=False)

    def document_ids(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InputError("the document is empty: pass some text (or files holding some)")
        ids = list(self._tokenizer.encode(text, add_special_tokens=False, verbose=False))
        if not ids:
            raise InputError("the document encodes to no tokens (only whitespace?): pass some visible text")
        return ids

    def turn_ids(self, question: str, *, first: bool) -> list[int]:
        """Ids of a user turn with `question`, up to the start of the answer (`first`: no answer before it)."""
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty: type some text to ask about the document")
        if self.template == PLAIN:
            return list(self._tokenizer.encode(question, add_special_tokens=False, verbose=False))
        if not first and self.single_turn:
            raise InputError(
                f"template {self.template!r} holds one question per conversation: reset the conversation "
                "(/reset) to ask another, or use the default chat template"
            )
        text = (self._first_turn if first else self._next_turn).replace(_USER_SLOT, question)
        return _segment_ids(self._tokenizer, text)


def chat_format(tokenizer, template: str | None = None, *, system: str | None = None) -> ChatFormat:
    """The ChatFormat of `template` (a name of the tokenizer's templates, `none` for plain continuation, None for
    the tokenizer's default) with `system` text (None: the template's own)."""
    name = DEFAULT_TEMPLATE if template is None else template
    bos = tokenizer.bos_token_id
    if bos is None:
        raise InputError("this tokenizer has no BOS token; load it with longllama.tokenizer.load_tokenizer")
    if name == PLAIN:
        if system:
            raise InputError("--template none has no system text: drop --system, or name a chat template")
        newline = _suffix_ids(tokenizer, "\n")
        return ChatFormat(PLAIN, None, (bos,), tuple(newline), _STOP_STRINGS[PLAIN], False, tokenizer, "", "")
    names = _template_names(tokenizer)
    if name not in names:
        raise InputError(
            f"chat template {name!r} is not one of this tokenizer's ({', '.join(names)}): pass one of them, "
            f"or '{PLAIN}' for plain continuation"
        )
    if not hasattr(tokenizer, "_segment_ids"):
        raise InputError("chat formats need LongLlamaTokenizer: load the tokenizer with load_tokenizer(folder)")
    system = _DEFAULT_SYSTEM.get(name) if system is None else system
    with_system = system is not None
    user = {"role": "user", "content": _USER_SLOT}
    first = _render(tokenizer, name, _with_system([user], with_system), generation=True)
    if with_system and _SYSTEM_SLOT not in first:
        raise InputError(f"chat template {name!r} has no system text: drop --system")
    prefix, first_turn = _split_prefix(first, with_system)
    answered = _with_system([user, {"role": "assistant", "content": _ANSWER_SLOT}], with_system)
    closed = _render(tokenizer, name, answered, generation=False)
    end = closed[closed.index(_ANSWER_SLOT) + len(_ANSWER_SLOT) :]
    next_turn = _next_turn(tokenizer, name, answered, closed)
    prefix = prefix.replace(_SYSTEM_SLOT, system or "")
    return ChatFormat(
        template=name,
        system=system,
        prefix_ids=tuple(_segment_ids(tokenizer, prefix)),
        end_ids=tuple(_segment_ids(tokenizer, end)),
        stop_strings=_STOP_STRINGS.get(name, ()),
        single_turn=next_turn is None,
        _tokenizer=tokenizer,
        _first_turn=first_turn,
        _next_turn=next_turn,
    )


def _with_system(messages: list[dict[str, str]], with_system: bool) -> list[dict[str, str]]:
    return [{"role": "system", "content": _SYSTEM_SLOT}, *messages] if with_system else messages


def _template_names(tokenizer) -> list[str]:
    templates = getattr(tokenizer, "chat_template", None)
    if isinstance(templates, dict):
        return list(templates)
    if isinstance(templates, list):
        return [t["name"] for t in templates]
    return [DEFAULT_TEMPLATE] if templates else []


def _render(tokenizer, name: str, messages: list[dict[str, str]], *, generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            chat_template=name,
            add_generation_prompt=generation,
            **{_SEGMENT_VAR: _SEGMENT_MARK, _SPECIAL_VAR: _SPECIAL_MARK},
        )
    except Exception as exc:  # the template's raise_exception: a conversation shape it does not take
        raise InputError(f"chat template {name!r} cannot render this conversation ({exc})") from None


def _split_prefix(rendered: str, with_system: bool) -> tuple[str, str]:
    """(text before the document, the first turn): the document follows the system text or, without one, BOS."""
    if with_system:
        cut = rendered.index(_SYSTEM_SLOT) + len(_SYSTEM_SLOT)
    else:
        cut = rendered.rindex(_SEGMENT_MARK, 0, rendered.index(_USER_SLOT))
    return rendered[:cut], rendered[cut:]


def _next_turn(tokenizer, name: str, answered: list[dict[str, str]], closed: str) -> str | None:
    """The text of a second user turn after the first answer and its end, or None for one-question templates."""
    again = [*answered, {"role": "user", "content": _NEXT_SLOT}]
    try:
        rendered = _render(tokenizer, name, again, generation=True)
    except InputError:
        return None
    if not rendered.startswith(closed):
        raise InputError(f"chat template {name!r} renders earlier turns differently later on; use another template")
    return rendered[len(closed) :].replace(_NEXT_SLOT, _USER_SLOT)


def _segment_ids(tokenizer, text: str) -> list[int]:
    return tokenizer._segment_ids(text) if text else []


def _suffix_ids(tokenizer, text: str) -> list[int]:
    """Ids of `text` as it continues other text (no dummy-prefix space): those that appending it adds."""
    base = tokenizer.encode("a", add_special_tokens=False)
    joined = tokenizer.encode("a" + text, add_special_tokens=False)
    if joined[: len(base)] != base:
        raise InputError(f"cannot tokenize {text!r} as a continuation with this tokenizer")
    return joined[len(base) :]
