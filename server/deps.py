"""The request dependencies every route module uses: the server's state, the caller's grant, and the
admin check. Their own module (as in the FastAPI project template) so imports run one way:
app -> routes -> deps -> state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.auth import OPEN_GRANT, Grant
from server.state import ServerState


def get_state(request: Request) -> ServerState:
    return request.app.state.server


def get_grant(request: Request) -> Grant:
    """The caller's grant from `Authorization: Bearer KEY`; everything is allowed without keys."""
    keys = request.app.state.server.settings.api_keys
    if keys is None:
        return OPEN_GRANT
    return keys.authenticate(request.headers.get("authorization"))


def get_admin(request: Request) -> Grant:
    grant = get_grant(request)
    grant.require_admin()
    return grant


StateDep = Annotated[ServerState, Depends(get_state)]
GrantDep = Annotated[Grant, Depends(get_grant)]
AdminDep = Annotated[Grant, Depends(get_admin)]
