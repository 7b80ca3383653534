"""Session keys: which engine session a client's sequence id names.

The engine keys sessions by one value. At the server edge that value is a
:class:`SessionKey`, a string made of the owning principal and the sequence id::

    <owner>/n:<integer id>     <owner>/s:<text id>     <owner>/t:<random>  (stream-scoped)

Owner names contain no ``/`` and the tag after it says which kind of id follows, so the
mapping is injective: two principals sending the same id reach two different sessions, the
integer 5 and the text "5" stay different sequences (Triton's semantics), and no id a
client can send reaches a stream-scoped session (tag ``t``), which only its stream knows.

Sequence ids are compared byte for byte (no Unicode normalization, no case folding); text
ids are at most 256 bytes of UTF-8 without control characters, and the ``_stream:`` prefix
is reserved. A SessionKey's ``repr`` is the client's own id, so engine messages such as
"sequence 42 already runs policy ..." read as the client sent it.
"""

from __future__ import annotations

import unicodedata
import uuid

from ttaserve.errors import InvalidInput
from ttaserve.sessions import SequenceId, Session

MAX_SEQUENCE_ID_BYTES = 256
RESERVED_PREFIX = "_stream:"


class SessionKey(str):
    """The engine's key of one principal's session (a ``str``, so it hashes, compares and
    serializes as the text above)."""

    owner: str
    sequence_id: SequenceId | None  # None: a stream-scoped session

    def __new__(cls, owner: str, sequence_id: SequenceId | None, stream: str | None = None) -> SessionKey:
        if sequence_id is None:
            text = f"{owner}/t:{stream or uuid.uuid4().hex}"
        else:
            text = f"{owner}/{'n' if isinstance(sequence_id, int) else 's'}:{sequence_id}"
        key = super().__new__(cls, text)
        key.owner, key.sequence_id = owner, sequence_id
        return key

    @property
    def scoped(self) -> bool:
        """True for a stream-scoped session (never persisted, never addressable by id)."""
        return self.sequence_id is None

    def __repr__(self) -> str:
        return repr(self.sequence_id) if self.sequence_id is not None else "<stream-scoped session>"

    def __reduce__(self) -> tuple[object, ...]:
        return parse_key, (str(self),)


def parse_key(text: str) -> SessionKey:
    """The SessionKey whose text is ``text`` (e.g. read back from a state file)."""
    owner, slash, rest = text.partition("/")
    tag, colon, value = rest.partition(":")
    if not slash or not colon or not owner or tag not in ("n", "s", "t"):
        raise ValueError(f"not a session key: {text[:80]!r}")
    if tag == "t":
        return SessionKey(owner, None, value)
    return SessionKey(owner, int(value) if tag == "n" else value)


def check_sequence_id(value: object) -> SequenceId | None:
    """A client's sequence id, validated: None for "no sequence" (0 or "")."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidInput("sequence_id must be an integer or a string")
    if not value:
        return None
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise InvalidInput("sequence_id must fit in 64 bits")
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_SEQUENCE_ID_BYTES:
        raise InvalidInput(f"sequence_id is {size} bytes long; the limit is {MAX_SEQUENCE_ID_BYTES} "
                           "bytes of UTF-8 (use a shorter id, e.g. a UUID)")
    if value.startswith(RESERVED_PREFIX):
        raise InvalidInput(f"sequence ids starting with {RESERVED_PREFIX!r} are reserved for "
                           "stream-scoped sessions; choose another id")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise InvalidInput("sequence_id must not contain control characters")
    return value


def key_of(session: Session) -> SessionKey:
    """The SessionKey of a session held by the server."""
    key = session.sequence_id
    return key if isinstance(key, SessionKey) else parse_key(str(key))
