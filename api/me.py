"""`GET /api/v1/me`: who the caller's API key speaks for (its account and scopes); what the web UI signs in with."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Security

from agentrt.api.auth import api_caller
from agentrt.api.schemas import ERROR_RESPONSES, MeOut
from agentrt.services.api_keys import ApiCaller

router = APIRouter(prefix='/api/v1', tags=['keys'], responses=ERROR_RESPONSES)


@router.get('/me', summary="The API key's account and scopes")
async def me(caller: Annotated[ApiCaller, Security(api_caller)]) -> MeOut:
    """The account the key belongs to, the key's public id and its scopes; any valid key may ask (401 otherwise)."""
    return MeOut(account=caller.account_slug, key_id=caller.public_id, scopes=sorted(caller.scopes))
