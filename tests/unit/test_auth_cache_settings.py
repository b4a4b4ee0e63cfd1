"""``auth_cache_ttl_s``: 0 turns the token cache off, a negative TTL is refused by name."""

from __future__ import annotations

import pytest

from chatd.config import Settings, SettingsError


def test_the_auth_cache_ttl_may_be_zero_but_not_negative() -> None:
    assert Settings().auth_cache_ttl_s == 10.0
    assert Settings.load(env={"CHATD_AUTH_CACHE_TTL_S": "0"}).auth_cache_ttl_s == 0.0
    with pytest.raises(SettingsError, match="CHATD_AUTH_CACHE_TTL_S"):
        Settings(auth_cache_ttl_s=-1.0)
