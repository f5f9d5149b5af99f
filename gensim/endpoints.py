"""The simulator's endpoint kinds: what routes name, faults target and stats count."""

from __future__ import annotations

#: One name per kind of request the simulator serves (see ``server.ROUTES``).
ENDPOINT_KINDS = (
    "generate",
    "get_generation",
    "stop",
    "continue",
    "get_cell",
    "get_layer",
    "patch_cell",
    "content_resource",
    "upload_content_resource",
    "direct_upload",
    "direct_upload_put",
    "create_content_resource",
    "cdn",
    "me",
    "automation_config",
    "set_automation_config",
    "test_webhook",
    "test_callback",
)
