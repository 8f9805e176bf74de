"""OpenAI-compatible HTTP gateway in front of the coordinator (`r2r gateway`).

`POST /v1/completions`, `POST /v1/chat/completions` (JSON or server-sent events), `GET /v1/models`,
`GET /health`. Request fields are validated and mapped in `schema`; the HTTP app and its runners are in `app`.
"""

from r2r_serve.gateway.app import (GatewayHandle, GatewaySettings, add_gateway_args, build_app, run_gateway,
                                  start_gateway)

__all__ = ["GatewayHandle", "GatewaySettings", "add_gateway_args", "build_app", "run_gateway", "start_gateway"]
