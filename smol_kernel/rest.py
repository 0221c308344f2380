"""REST routes of the Jupyter server extension: checkpoints, rewinds and forks of smolvm kernels.

Authenticated and authorized like the server's own kernel API (resource ``kernels``; reading
a list is ``read``, the rest ``write``):

* ``GET  /smol-kernel/api/kernels/<id>/checkpoints`` -> ``[checkpoint, ...]``
* ``POST /smol-kernel/api/kernels/<id>/checkpoints`` ``{"name"?, "keep"?}`` -> checkpoint
* ``POST /smol-kernel/api/kernels/<id>/rewind`` ``{"name"}`` -> checkpoint
* ``POST /smol-kernel/api/kernels/<id>/fork`` ``{"n"?, "checkpoint"?}`` -> ``[kernel, ...]``
  (new kernels of the server, as ``/api/kernels`` lists them)

Refusals (a busy kernel, a kernel with shares, a quota, an unknown name) are 409/400 with
the reason in ``message``.
"""

from __future__ import annotations

import json
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from . import checkpoint as store
from .checkpoint import CheckpointError
from .vm.base import VmError

KERNEL_ID = r"(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)"
MAX_FORKS = 16


class _KernelHandler(APIHandler):
    auth_resource = "kernels"

    def provisioner(self, kernel_id: str) -> Any:
        km = self.kernel_manager
        if kernel_id not in km:
            raise web.HTTPError(404, f"no kernel {kernel_id}")
        provisioner = km.get_kernel(kernel_id).provisioner
        if not type(provisioner).__module__.startswith("smol_kernel."):
            raise web.HTTPError(400, f"kernel {kernel_id} is not a smolvm kernel")
        return provisioner

    def body(self) -> dict:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the body is not a JSON object")
        return body

    async def refusing(self, call: Any) -> Any:
        try:
            return await call
        except CheckpointError as e:
            raise web.HTTPError(409, str(e)) from None
        except VmError as e:
            raise web.HTTPError(409, f"the kernel's VM: {e}") from None


class CheckpointsHandler(_KernelHandler):
    @web.authenticated
    @authorized
    async def get(self, kernel_id: str) -> None:
        found = await self.provisioner(kernel_id).checkpoints()
        self.finish(json.dumps([c.as_dict() for c in found]))

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        name = body.get("name")
        if name is not None and not isinstance(name, str):
            raise web.HTTPError(400, "name must be a string")
        prov = self.provisioner(kernel_id)
        cp = await self.refusing(prov.checkpoint(name or None, bool(body.get("keep"))))
        self.set_status(201)
        self.finish(json.dumps(cp.as_dict()))


class RewindHandler(_KernelHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        name = self.body().get("name")
        if not isinstance(name, str) or not name:
            raise web.HTTPError(400, 'give the checkpoint: {"name": NAME}')
        cp = await self.refusing(self.provisioner(kernel_id).rewind(name))
        self.finish(json.dumps(cp.as_dict()))


class ForkHandler(_KernelHandler):
    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        body = self.body()
        n, name = body.get("n", 1), body.get("checkpoint")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_FORKS:
            raise web.HTTPError(400, f"n must be 1 to {MAX_FORKS}")
        if name is not None and not isinstance(name, str):
            raise web.HTTPError(400, "checkpoint must be a name")
        km = self.kernel_manager
        source_kernel = km.get_kernel(kernel_id) if kernel_id in km else None
        source, temporary = await self.refusing(self.provisioner(kernel_id).fork_source(name))
        started: list[str] = []
        try:
            for _ in range(n):
                kid = await km.start_kernel(kernel_name=source_kernel.kernel_name,
                                            restore_from=source)  # fmt: skip
                started.append(kid)
                ready = getattr(km.get_kernel(kid), "ready", None)
                if ready is not None:  # (pending kernels: started, not yet restored)
                    await ready
        except Exception as e:
            for kid in started:
                await km.shutdown_kernel(kid, now=True)
            raise web.HTTPError(409, f"the fork did not start: {e}") from None
        finally:
            if temporary:
                store.remove(source)
        self.set_status(201)
        self.finish(json.dumps([km.kernel_model(k) for k in started], default=str))


def handlers(base_url: str) -> list[tuple[str, type]]:
    from jupyter_server.utils import url_path_join

    root = url_path_join(base_url, "smol-kernel", "api", "kernels", KERNEL_ID)
    return [
        (url_path_join(root, "checkpoints"), CheckpointsHandler),
        (url_path_join(root, "rewind"), RewindHandler),
        (url_path_join(root, "fork"), ForkHandler),
    ]
