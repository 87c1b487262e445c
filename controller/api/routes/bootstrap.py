"""What a joining machine fetches without an API token: the installer, the manifest (the
agent wheel's sha256, NATS URL, command keys, systemd unit), the wheel and the CA. None of it
is secret; all of it is trusted through the join token's CA pin (controller/provision/
bootstrap.py)."""

from __future__ import annotations

from aiohttp import web

from controller.api.access import requires
from controller.api.keys import BOOTSTRAP
from controller.errors import NotFound
from controller.provision.bootstrap import check_base_url, installer_script


def _base_url(request: web.Request) -> str:
    # The address the machine reached us at, so that the installer comes back to it.
    try:
        return check_base_url(f"{request.scheme}://{request.host}")
    except ValueError:
        raise web.HTTPBadRequest(text="bad Host header\n") from None


@requires("public")
async def install_sh(request: web.Request) -> web.Response:
    return web.Response(text=installer_script(_base_url(request)),
                        content_type="text/x-shellscript")


@requires("public")
async def manifest(request: web.Request) -> web.Response:
    return web.json_response(await request.app[BOOTSTRAP].manifest())


@requires("public")
async def agent_wheel(request: web.Request) -> web.StreamResponse:
    wheel = await request.app[BOOTSTRAP].wheel()
    return web.FileResponse(wheel.path, headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{wheel.filename}"'})


@requires("public")
async def ca_der(request: web.Request) -> web.Response:
    files = request.app[BOOTSTRAP]
    if not files.ca_der:
        raise NotFound("this controller serves no TLS: there is no CA to pin")
    return web.Response(body=files.ca_der, content_type="application/pkix-cert")


def routes() -> list[web.RouteDef]:
    return [
        web.get("/install.sh", install_sh),
        web.get("/v1/bootstrap/manifest", manifest),
        web.get("/v1/bootstrap/agent", agent_wheel),
        web.get("/v1/bootstrap/ca.der", ca_der),
    ]
