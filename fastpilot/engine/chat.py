"""Chat prompt rendering for models without a chat template (GPT-2, CodeGen).

The plain layout is the one base models continue best::

    System: You are terse.
    User: Hello
    Assistant:

and generation stops at the next turn marker (``"\\nUser:"``), so a base
model that keeps writing the dialogue does not answer for the user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastpilot.errors import InvalidRequest

ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "developer": "System"}
DEFAULT_STOPS: tuple[str, ...] = ("\nUser:", "\nSystem:")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


def validate_messages(messages: Any) -> list[Message]:
    """Check an OpenAI ``messages`` list; raises InvalidRequest with ``param="messages"``.

    Content may be a string or a list of ``{"type": "text", "text": ...}``
    parts (joined); anything else (images, tool calls) is refused.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequest(
            "messages must be a non-empty list of {role, content} objects", param="messages"
        )
    out: list[Message] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRequest(
                f"messages[{i}] must be an object with role and content", param="messages"
            )
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list/dict role is unhashable
            raise InvalidRequest(
                f"messages[{i}].role must be one of {sorted(ROLES)}, got {str(role)[:40]!r}",
                param="messages",
            )
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (
                    isinstance(part, Mapping)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise InvalidRequest(
                        f"messages[{i}].content parts must be text parts", param="messages"
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", param="messages")
        out.append(Message(role, content))
    return out


def render_plain(messages: Sequence[Message]) -> str:
    """Role-tagged transcript ending with ``"Assistant:"`` for the model to continue."""
    lines = [f"{ROLES[m.role]}: {m.content}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)
