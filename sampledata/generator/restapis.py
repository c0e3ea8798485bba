"""The REST half of minicloud: small but real OpenStack-style WSGI services.

Each API is a WSGI application behind the REAL oslo.middleware RequestId middleware
(nova's compat header x-compute-request-id included), served by cheroot (an HTTP/1.1
keep-alive WSGI server) on the service's usual port. Services call each other with the
REAL keystoneauth1 Session, as OpenStack does: its User-Agent (`<argv0> keystoneauth1/...`
or a client library's name), X-OpenStack-Request-ID carrying the caller's global request
id, X-Auth-Token / X-Subject-Token for keystonemiddleware-style token validation.

Ground truth: every client writes what it sent and got (`rest_call`), every service what
it handled (`rest_handled`), from inside the process.
"""

import json
import os
import threading
import time
import uuid

PORTS = {"keystone": 5000, "nova": 8774, "glance": 9292, "neutron": 9696, "placement": 8778}
SERVICE_PROCESS = {"keystone": "keystone", "nova": "nova-api", "glance": "glance-api",
                   "neutron": "neutron-server", "placement": "placement-api"}
HOST = "127.0.0.1"
# Passwords travel in clear in keystone's POST /v3/auth/tokens body, tokens in headers:
# stacktap's tests grep every output for these prefixes.
PASSWORD_PREFIX = "secret-password-"
KSM_UA = "%s/%s keystonemiddleware.auth_token/10.7.0"  # as keystonemiddleware builds it
PROJECT_VERSIONS = {"nova": "32.0.0", "neutron": "27.0.0", "glance": "31.0.0",
                    "placement": "14.0.0"}


def url(service, path):
    return "http://%s:%d%s" % (HOST, PORTS[service], path)


class Client:
    """Outbound REST with keystoneauth1, recording what the caller saw.

    The User-Agent is built by keystoneauth1 itself from what real code hands it
    (oslo-wire.md §7.4): nothing (`<argv0> keystoneauth1/...`), an app name and version
    (`app_name`), a client library on an Adapter (`client_name`, as python-novaclient's
    SessionClient passes), extras such as the SDK's (`additional`), or a fixed string sent
    verbatim per request (`exact`, as the older service clients and non-Python tools do).
    """

    def __init__(self, truth, caller, token_prefix, user_agent=None, app_name=None,
                 app_version=None, client_name=None, client_version=None, additional=None,
                 exact=None):
        from keystoneauth1 import adapter, session
        if app_name and app_version is None and app_name == "openstacksdk":
            app_version = "4.22.0"
        self.session = session.Session(user_agent=user_agent, app_name=app_name,
                                       app_version=app_version,
                                       additional_user_agent=additional or [])
        self.adapter = adapter.Adapter(self.session, client_name=client_name,
                                       client_version=client_version)
        self.exact = exact
        self.truth, self.caller, self.token_prefix = truth, caller, token_prefix
        self.token = None

    def login(self, user):
        """POST /v3/auth/tokens with a password: the token comes back in X-Subject-Token."""
        body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"id": "default"},
            "password": PASSWORD_PREFIX + uuid.uuid4().hex}}}}}
        r = self.call("keystone", "POST", "/v3/auth/tokens", json=body, authenticated=False)
        self.token = r.headers.get("X-Subject-Token")
        return self.token

    def call(self, service, method, path, global_request_id=None, json=None,
             authenticated=True, headers=None, route=None):
        hdrs = dict(headers or {})
        if authenticated and self.token:
            hdrs["X-Auth-Token"] = self.token
        t_start = time.time()
        extra = {"user_agent": self.exact} if self.exact else {}
        r = self.adapter.request(url(service, path), method, json=json, headers=hdrs,
                                 raise_exc=False, global_request_id=global_request_id, **extra)
        t_end = time.time()
        self.truth.write(kind="rest_call", caller=self.caller, pid=os.getpid(),
                         service=service, method=method, path=path.split("?")[0],
                         route=route, status=r.status_code, t_start=t_start, t_end=t_end,
                         global_request_id=global_request_id,
                         request_id=r.headers.get("x-openstack-request-id"),
                         user_agent=r.request.headers.get("User-Agent"))
        return r


def _json_response(start_response, status, body=None, headers=()):
    from webob import Response
    if status == 204:
        resp = Response(status=204)
        resp.headers.pop("Content-Type", None)
    else:
        resp = Response(status=status, content_type="application/json",
                        body=json.dumps(body or {}).encode())
    for k, v in headers:
        resp.headers[k] = v
    return resp


class Api:
    """One WSGI service: routes, token validation through keystone, truth per request."""

    def __init__(self, name, truth, keystone_client=None, faults=None):
        self.name, self.truth, self.faults = name, truth, faults or {}
        self.keystone = keystone_client  # validates incoming tokens (keystonemiddleware)
        self.valid_tokens = set()
        self.lock = threading.Lock()
        self.counts = {}

    def every(self, fault):
        """True on every Nth request of a fault kind (N from --rest-faults)."""
        n = self.faults.get(fault)
        if not n:
            return False
        with self.lock:
            self.counts[fault] = self.counts.get(fault, 0) + 1
            return self.counts[fault] % n == 0

    def check_token(self, req, global_id):
        token = req.headers.get("X-Auth-Token")
        if not token:
            return False
        if token in self.valid_tokens or self.keystone is None:
            return True
        r = self.keystone.call("keystone", "GET", "/v3/auth/tokens",
                               headers={"X-Subject-Token": token},
                               global_request_id=None, route="/v3/auth/tokens")
        if r.status_code == 200:
            self.valid_tokens.add(token)
            return True
        return False

    def __call__(self, environ, start_response):
        from webob import Request
        req = Request(environ)
        t_start = time.time()
        local = environ.get("openstack.request_id")
        glob = environ.get("openstack.global_request_id")
        ctx_global = glob or local  # oslo.context's global_id: what goes out
        if self.name != "keystone" and not self.check_token(req, ctx_global):
            resp = _json_response(start_response, 401, {"error": {
                "code": 401, "title": "Unauthorized",
                "message": "The request you have made requires authentication."}})
            route = None
        else:
            status, body, route, headers = self.handle(req, local, glob, ctx_global)
            resp = _json_response(start_response, status, body, headers)
        self.truth.write(kind="rest_handled", service=self.name, pid=os.getpid(),
                         method=req.method, path=req.path, route=route,
                         status=resp.status_code, request_id=local, global_request_id=glob,
                         user_agent=req.user_agent, t_start=t_start, t_end=time.time())
        return resp(environ, start_response)

    def handle(self, req, local, glob, ctx_global):
        raise NotImplementedError

    def failure(self, operation, error, local, glob, cause=None):
        """Truth: this service failed a request (cause: the downstream failure it saw)."""
        self.truth.write(kind="failure", service=SERVICE_PROCESS[self.name], pid=os.getpid(),
                         operation=operation, error=error, cause=cause, request_id=local,
                         global_request_id=glob, t=time.time())

    def surfaced(self, how, cause, local, glob):
        """Truth: a failure became visible to the user here."""
        self.truth.write(kind="surfaced", service=SERVICE_PROCESS[self.name], pid=os.getpid(),
                         how=how, cause=cause, request_id=local, global_request_id=glob,
                         t=time.time())


class Keystone(Api):
    def __init__(self, truth, token_prefix):
        super().__init__("keystone", truth)
        self.token_prefix = token_prefix
        self.issued = set()

    def handle(self, req, local, glob, ctx_global):
        if req.path == "/v3/auth/tokens" and req.method == "POST":
            req.json_body  # parsed, as keystone does; the password is checked and dropped
            token = self.token_prefix + uuid.uuid4().hex
            self.issued.add(token)
            return 201, {"token": {"methods": ["password"], "expires_at": "2099-01-01T00:00:00Z",
                                   "catalog": []}}, "/v3/auth/tokens", [("X-Subject-Token", token)]
        if req.path == "/v3/auth/tokens" and req.method == "GET":
            subject = req.headers.get("X-Subject-Token")
            if subject in self.issued:
                return 200, {"token": {"methods": ["password"]}}, "/v3/auth/tokens", \
                    [("X-Subject-Token", subject)]
            return 404, {"error": {"code": 404, "title": "Not Found",
                                   "message": "Could not find token."}}, "/v3/auth/tokens", []
        return 404, {"error": {"code": 404, "title": "Not Found", "message": "Not found"}}, None, []


class Glance(Api):
    def handle(self, req, local, glob, ctx_global):
        parts = req.path.strip("/").split("/")
        if parts[:2] == ["v2", "images"] and len(parts) == 3:
            return 200, {"id": parts[2], "status": "active"}, "/v2/images/{image_id}", []
        if parts[:2] == ["v2", "images"] and len(parts) == 2:
            return 200, {"images": []}, "/v2/images", []
        return 404, None, None, []


class Placement(Api):
    def handle(self, req, local, glob, ctx_global):
        parts = req.path.strip("/").split("/")
        if parts == ["allocation_candidates"]:
            if self.every("placement_500"):
                return 500, {"errors": [{"status": 500, "title": "Internal Server Error",
                                         "detail": "Database connection lost",
                                         "request_id": local,
                                         "code": "placement.undefined_code"}]}, \
                    "/allocation_candidates", []
            return 200, {"allocation_requests": [], "provider_summaries": {}}, \
                "/allocation_candidates", []
        if parts[0] == "allocations" and len(parts) == 2 and req.method == "PUT":
            return 204, None, "/allocations/{consumer_uuid}", []
        if parts == ["usages"]:
            if self.every("usages_500"):
                self.failure("GET /usages", "Internal Server Error", local, glob)
                return 500, {"errors": [{"status": 500, "title": "Internal Server Error",
                                         "detail": "Database connection lost",
                                         "request_id": local,
                                         "code": "placement.undefined_code"}]}, "/usages", []
            return 200, {"usages": {"VCPU": 2}}, "/usages", []
        return 404, None, None, []


class Neutron(Api):
    def __init__(self, truth, keystone_client, nova_client, faults, flaky_host=None):
        super().__init__("neutron", truth, keystone_client, faults)
        self.nova = nova_client
        self.flaky_host = flaky_host  # binding on this host always fails
        self.seen, self.doomed = set(), set()  # instances whose ports bind nowhere

    def binding_fails(self, port):
        if self.flaky_host and port.get("binding:host_id") == self.flaky_host:
            return True
        n = self.faults.get("doomed_instance")
        device = port.get("device_id")
        with self.lock:
            if n and device and device not in self.seen:
                self.seen.add(device)
                if len(self.seen) % n == 0:
                    self.doomed.add(device)
            return device in self.doomed

    def handle(self, req, local, glob, ctx_global):
        parts = req.path.strip("/").split("/")
        if parts == ["v2.0", "networks"]:
            return 200, {"networks": [{"id": str(uuid.uuid4()), "name": "private"}]}, \
                "/v2.0/networks", []
        if parts[:2] == ["v2.0", "ports"] and len(parts) == 3 and req.method == "PUT":
            port = req.json_body.get("port") or {}
            if self.binding_fails(port) or self.every("port_binding"):
                self.failure("PUT /v2.0/ports/{port_id}", "PortBindingFailed", local, glob)
                return 500, {"NeutronError": {
                    "type": "PortBindingFailed",
                    "message": "Binding failed for port %s, host %s" % (
                        parts[2], (req.json_body.get("port") or {}).get("binding:host_id")),
                    "detail": ""}}, "/v2.0/ports/{port_id}", []
            # a bound port: nova is told, as neutron's nova notifier does
            self.nova.call("nova", "POST", "/v2.1/os-server-external-events",
                           global_request_id=ctx_global, route="/v2.1/os-server-external-events",
                           json={"events": [{"name": "network-vif-plugged",
                                             "server_uuid": str(uuid.uuid4()),
                                             "tag": parts[2], "status": "completed"}]})
            return 200, {"port": {"id": parts[2], "status": "ACTIVE"}}, \
                "/v2.0/ports/{port_id}", []
        return 404, {"NeutronError": {"type": "HTTPNotFound", "message": "not found",
                                      "detail": ""}}, None, []


class Nova(Api):
    """nova-api: the user's entry point; casts the build to the conductor over RPC."""

    def __init__(self, truth, keystone_client, glance, neutron, build, placement=None,
                 console=None, legacy=None):
        super().__init__("nova", truth, keystone_client)
        self.glance, self.neutron, self.build = glance, neutron, build
        self.placement = placement  # quota counted in placement (nova's ksa adapter)
        self.console = console      # RPC call to a compute: (local, glob, host) -> (ok, err)
        self.servers = set()
        self.hosts = dict(legacy or {})  # servers from before, and where they run

    def handle(self, req, local, glob, ctx_global):
        parts = req.path.strip("/").split("/")
        if parts == ["v2.1", "servers"] and req.method == "POST":
            server = req.json_body.get("server", {})
            if self.placement:
                q = self.placement.call("placement", "GET", "/usages?project_id=p-demo",
                                        global_request_id=ctx_global, route="/usages")
                if q.status_code >= 500:
                    self.surfaced("http 500", {"service": "placement-api", "operation":
                                               "GET /usages", "error": "Internal Server Error"},
                                  local, glob)
                    return 500, {"computeFault": {
                        "code": 500, "message": "Unexpected API Error. Please report this at "
                        "http://bugs.launchpad.net/nova/ and attach the Nova API log if "
                        "possible.\n<class 'keystoneauth1.exceptions.http.InternalServerError'>"
                    }}, "/v2.1/servers", []
            img = self.glance.call("glance", "GET", "/v2/images/" + server.get("imageRef", ""),
                                   global_request_id=ctx_global, route="/v2/images/{image_id}")
            if img.status_code != 200:
                return 400, {"badRequest": {"code": 400, "message": "Image not found."}}, \
                    "/v2.1/servers", []
            self.neutron.call("neutron", "GET", "/v2.0/networks?shared=true",
                              global_request_id=ctx_global, route="/v2.0/networks")
            sid = str(uuid.uuid4())
            self.servers.add(sid)
            self.build(local, glob, sid, server.get("flavorRef"))
            return 202, {"server": {"id": sid}}, "/v2.1/servers", []
        if (parts[:2] == ["v2.1", "servers"] and len(parts) == 3 and req.method == "GET"
                and parts[2] != "detail"):
            if parts[2] in self.servers:
                return 200, {"server": {"id": parts[2], "status": "BUILD"}}, \
                    "/v2.1/servers/{server_id}", []
            return 404, {"itemNotFound": {"code": 404,
                                          "message": "Instance %s could not be found." % parts[2]}}, \
                "/v2.1/servers/{server_id}", []
        if parts == ["v2.1", "servers", "detail"] and req.method == "GET":
            return 200, {"servers": [{"id": s, "OS-EXT-SRV-ATTR:host": h}
                                     for s, h in sorted(self.hosts.items())]}, \
                "/v2.1/servers/detail", []
        if (parts[:2] == ["v2.1", "servers"] and len(parts) == 4 and parts[3] == "action"
                and req.method == "POST" and self.console):
            host = self.hosts.get(parts[2])
            if host is None:
                return 404, {"itemNotFound": {"code": 404, "message": "Instance %s could not "
                                              "be found." % parts[2]}}, \
                    "/v2.1/servers/{server_id}/action", []
            ok, error = self.console(local, glob, host)
            if not ok:
                self.surfaced("http 500", {"service": "queue:compute." + host, "operation":
                                           "compute.get_console_output", "error": error},
                              local, glob)
                return 500, {"computeFault": {"code": 500, "message": "Unexpected API Error."
                                              " <class 'oslo_messaging.exceptions."
                                              "MessagingTimeout'>"}}, \
                    "/v2.1/servers/{server_id}/action", []
            return 200, {"output": "login: "}, "/v2.1/servers/{server_id}/action", []
        if parts == ["v2.1", "flavors", "detail"]:
            return 200, {"flavors": [{"id": "1", "name": "m1.tiny"}]}, "/v2.1/flavors/detail", []
        if parts == ["v2.1", "os-server-external-events"] and req.method == "POST":
            return 200, {"events": req.json_body.get("events", [])}, \
                "/v2.1/os-server-external-events", []
        return 404, {"itemNotFound": {"code": 404, "message": "Not found"}}, None, []


class ComputeReqId:
    """nova's request-id middleware: oslo's, with the x-compute-request-id compat header."""

    @staticmethod
    def wrap(app, compat):
        from oslo_middleware import request_id

        class _M(request_id.RequestId):
            compat_headers = compat
        return _M(app)


def serve(service, app, stop):
    """Serves `app` on the service's port until `stop` is set (cheroot, HTTP/1.1)."""
    from cheroot import wsgi
    compat = ["x-compute-request-id"] if service == "nova" else []
    server = wsgi.Server((HOST, PORTS[service]), ComputeReqId.wrap(app, compat),
                         numthreads=8, server_name=service)
    server.prepare()  # binds now: a busy port fails here, loudly
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()

    def stopper():
        stop.wait()
        server.stop()
    threading.Thread(target=stopper, daemon=True).start()
    return server


def service_client(truth, caller, token_prefix, **ua_form):
    """A service's own keystoneauth session, logged in with the service user's password;
    `ua_form` as `Client` takes it."""
    c = Client(truth, caller, token_prefix, **ua_form)
    c.login(caller)
    return c


def middleware_client(truth, caller, project, token_prefix):
    """keystonemiddleware's session: its own User-Agent, the service user's token."""
    ua = KSM_UA % (project, PROJECT_VERSIONS.get(project, "1.0.0"))
    c = Client(truth, caller, token_prefix, user_agent=ua)
    c.login(caller)
    return c
