"""What a user name and a token label may be; the ``users.name`` and ``api_tokens.label``
CHECKs in the schema say the same."""

from __future__ import annotations

import re

USER_NAME_RULE = "1-128 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
MAX_TOKEN_LABEL_CHARS = 200


def valid_user_name(name: str) -> bool:
    return _USER_NAME.fullmatch(name) is not None
