#!/usr/bin/env python3
"""minicloud: a small, real "mini OpenStack" that records captures for stacktap.

Every process here uses the REAL oslo.messaging library (rabbit driver) against the
REAL RabbitMQ broker on 127.0.0.1:5672.  tcpdump records the traffic on lo.  The
ground truth is written by the processes themselves while they run (what the caller
sent and saw, what each server handled and raised), never derived from stacktap.

    minicloud.py record SCENARIO --out DIR [--calls N]   # DIR/SCENARIO.pcap + .truth.jsonl
    minicloud.py list                                     # the scenarios

Roles (one OS process each; argv[0] is set to the service name, which is what
oslo.messaging puts in the AMQP connection_name, exactly as in a real deployment):
  nova-api        the driver: user operations, direct calls to computes
  nova-conductor  topic "conductor": schedule_and_build_instances (cast, ns compute_task),
                  object_action (call)
  nova-scheduler  topic "scheduler" x2: select_destinations (call), update_instance_info
                  (fanout, so every scheduler gets a copy)
  nova-compute    topic "compute", server hostN: build_and_run_instance (cast),
                  attach_interface / get_console_output / slow_op (calls)

The "rest" scenario adds real WSGI APIs (restapis.py: keystone, nova-api, glance,
neutron-server, placement-api on their usual ports, oslo.middleware request ids,
keystoneauth1 clients) and a user ("openstack") who boots servers through nova's API;
the scheduler then calls placement and the computes bind ports in neutron.
"""

import argparse
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

BROKER = os.environ.get("MINICLOUD_BROKER", "127.0.0.1:5672")
# the cluster scenario's three RabbitMQ nodes (scripts/rabbitmq-cluster) and their names
CLUSTER = {"a": "127.0.0.1:5682", "b": "127.0.0.1:5683", "c": "127.0.0.1:5684"}


def brokers(args):
    """The broker addresses a process talks to: every node of the cluster, or the one."""
    return (getattr(args, "brokers", None) or BROKER).split(",")
HERE = os.path.dirname(os.path.abspath(__file__))
# A fake Keystone token: it travels in clear in _context_auth_token, exactly like a real
# one. stacktap's tests grep every output for it to prove it never leaks.
FAKE_TOKEN_PREFIX = "gAAAAABsecret-token-"


# --------------------------------------------------------------------------------------
# ground truth, written by the process that knows it
# --------------------------------------------------------------------------------------
class Truth:
    def __init__(self, path):
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def write(self, **rec):
        with self._lock:
            self._f.write(json.dumps(rec, sort_keys=True) + "\n")


class WireIds(logging.Handler):
    """Captures the ids oslo.messaging itself logs when it sends a message.

    amqpdriver logs 'Expecting reply to msg <msg_id> in queue <reply_q>' for a call and
    'CAST unique_id: <id> ...' for a cast/fanout, in the sending thread, just before the
    publish.  A thread-local keeps concurrent callers apart.
    """

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.local = threading.local()

    def emit(self, record):
        msg = record.getMessage()
        m = re.match(r"Expecting reply to msg (\w+) in queue (\S+)", msg)
        if m:
            self.local.msg_id, self.local.reply_q = m.group(1), m.group(2)
            return
        m = re.match(r"CAST unique_id: (\w+)", msg)
        if m:
            self.local.unique_id = m.group(1)

    def take(self, name):
        value = getattr(self.local, name, None)
        setattr(self.local, name, None)
        return value


WIRE_IDS = WireIds()


def setup_logging():
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s " + sys.argv[0] +
                        "[%(process)d] %(levelname)s %(name)s: %(message)s")
    lg = logging.getLogger("oslo_messaging._drivers.amqpdriver")
    lg.setLevel(logging.DEBUG)
    lg.addHandler(WIRE_IDS)
    lg.propagate = False


# --------------------------------------------------------------------------------------
# oslo plumbing shared by every role
# --------------------------------------------------------------------------------------
# oslo.messaging's modern RabbitMQ options (oslo-wire.md, "Clusters and modern driver
# options"), by the name the scenarios use; the values are [oslo_messaging_rabbit] overrides
OSLO_OPTIONS = {
    "quorum": {"rabbit_quorum_queue": True, "rabbit_quorum_delivery_limit": 5},
    "transient_quorum": {"rabbit_transient_quorum_queue": True},
    "queue_manager": {"use_queue_manager": True},
    # streams need a prefetch (basic.qos)
    "stream_fanout": {"rabbit_stream_fanout": True, "rabbit_qos_prefetch_count": 10},
    "cancel_on_failover": {"enable_cancel_on_failover": True},
}
# what the modern and failover scenarios turn on (RabbitMQ refuses x-cancel-on-ha-failover
# on quorum queues: it is for classic mirrored ones)
SCENARIO_OPTIONS = {
    "modern": "quorum,transient_quorum,queue_manager,stream_fanout",
    "cluster": "quorum,transient_quorum",
    "failover": "cancel_on_failover",
}


def make_conf(args):
    from oslo_config import cfg
    import oslo_messaging

    oslo_messaging.set_transport_defaults("nova")  # control exchange, as nova does
    conf = cfg.CONF  # services use the global CONF; oslo registers its tracing opts there
    conf([], project="minicloud")
    # several hosts: oslo.messaging shuffles them for every connection it opens, so one
    # process's connections land on different nodes
    url = "rabbit://%s/%s" % (",".join("guest:guest@" + b for b in brokers(args)), args.vhost)
    rabbit = {}
    if getattr(args, "reply_retry", None):
        rabbit["kombu_missing_consumer_retry_timeout"] = args.reply_retry
    for option in filter(None, (getattr(args, "oslo_options", None) or "").split(",")):
        rabbit.update(OSLO_OPTIONS[option])
    if rabbit.get("use_queue_manager"):
        # the queue manager names queues after the host (one per simulated host) and
        # counts them in /dev/shm under an oslo.concurrency file lock
        rabbit["hostname"] = getattr(args, "host", None) or "api"
        from oslo_concurrency import lockutils
        lockutils.set_defaults(os.environ.get("MINICLOUD_LOCKS", "/tmp"))
    if rabbit:
        # the rabbit driver reads these when it is created: register and set them first
        from oslo_messaging._drivers import impl_rabbit
        conf.register_opts(impl_rabbit.rabbit_opts, group="oslo_messaging_rabbit")
        for k, v in rabbit.items():
            conf.set_override(k, v, group="oslo_messaging_rabbit")
    if getattr(args, "executor_threads", None):
        from oslo_messaging import server
        conf.register_opts(server._pool_opts)
        conf.set_override("executor_thread_pool_size", args.executor_threads)
    transport = oslo_messaging.get_rpc_transport(conf, url=url)
    return conf, transport, url


class ContextSerializer:
    """What nova's RequestContextSerializer does: context <-> to_dict()."""

    def serialize_entity(self, ctxt, entity):
        return entity

    def deserialize_entity(self, ctxt, entity):
        return entity

    def serialize_context(self, ctxt):
        return ctxt.to_dict()

    def deserialize_context(self, ctxt):
        from oslo_context import context
        return context.RequestContext.from_dict(ctxt)


def user_context(global_request_id=None):
    from oslo_context import context
    return context.RequestContext(
        user_id="u-" + uuid.uuid4().hex[:8], project_id="p-demo",
        auth_token=FAKE_TOKEN_PREFIX + uuid.uuid4().hex,
        roles=["member"], global_request_id=global_request_id)


def client(transport, topic, server=None, namespace=None, version=None, fanout=False):
    import oslo_messaging
    target = oslo_messaging.Target(topic=topic, server=server, namespace=namespace,
                                   version=version, fanout=fanout)
    return oslo_messaging.get_rpc_client(transport, target, serializer=ContextSerializer())


def timed_call(truth, caller, cctx, ctxt, method, target_desc, timeout, **kwargs):
    """A call, with the caller's own view recorded: ids, times, outcome."""
    import oslo_messaging
    t_start = time.time()
    outcome, error_class, result = "ok", None, None
    try:
        result = cctx.call(ctxt, method, **kwargs)
    except oslo_messaging.MessagingTimeout:
        outcome = "timeout"
    except oslo_messaging.RemoteError as e:
        outcome, error_class = "remote_error", e.exc_type
    except Exception as e:  # builtins are rebuilt client-side
        outcome, error_class = "remote_error", type(e).__name__
    t_end = time.time()
    truth.write(kind="call", caller=caller, pid=os.getpid(), method=method,
                msg_id=WIRE_IDS.take("msg_id"), reply_q=WIRE_IDS.take("reply_q"),
                timeout_s=timeout, request_id=ctxt.request_id,
                global_request_id=ctxt.global_request_id,
                t_start=t_start, t_end=t_end, outcome=outcome, error_class=error_class,
                **target_desc)
    return outcome, result


def timed_cast(truth, caller, cctx, ctxt, method, target_desc, **kwargs):
    t_start = time.time()
    cctx.cast(ctxt, method, **kwargs)
    truth.write(kind="cast", caller=caller, pid=os.getpid(), method=method,
                unique_id=WIRE_IDS.take("unique_id"), request_id=ctxt.request_id,
                t_start=t_start, t_end=time.time(), **target_desc)


def desc(topic, server=None, namespace=None, version=None, fanout=False, exchange="nova"):
    return dict(exchange=exchange, topic=topic, server=server, namespace=namespace,
                version=version, fanout=fanout)


# --------------------------------------------------------------------------------------
# nova-like exceptions (module nova.exception, with kwargs, like the real ones)
# --------------------------------------------------------------------------------------
class NovaException(Exception):
    msg_fmt = "An unknown exception occurred."

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        super().__init__(self.msg_fmt % kwargs)


class PortBindingFailed(NovaException):
    msg_fmt = "Binding failed for port %(port_id)s, please check neutron logs for more information."


class NoValidHost(NovaException):
    msg_fmt = "No valid host was found. %(reason)s"


for _cls in (NovaException, PortBindingFailed, NoValidHost):
    _cls.__module__ = "nova.exception"


# --------------------------------------------------------------------------------------
# services
# --------------------------------------------------------------------------------------
class Handled:
    """Every endpoint method records that it ran (and what it raised) before returning."""

    def __init__(self, truth, service, host):
        self.truth, self.service, self.host = truth, service, host

    def record(self, ctxt, method, kind, raised=None, **extra):
        self.truth.write(kind="handled", service=self.service, host=self.host,
                         pid=os.getpid(), method=method, msg_type=kind, t=time.time(),
                         request_id=ctxt.request_id if ctxt else None, raised=raised, **extra)


def endpoint_target(namespace=None, version=None):
    # oslo's dispatcher checks the request's version against the endpoint's target
    import oslo_messaging
    return oslo_messaging.Target(namespace=namespace, version=version)


class ConductorEndpoint(Handled):
    def __init__(self, truth):
        super().__init__(truth, "nova-conductor", None)
        self.target = endpoint_target(version="3.0")

    def object_action(self, ctxt, objname, objmethod):
        self.record(ctxt, "object_action", "call")
        return {"objname": objname, "objmethod": objmethod, "saved": True}


class ComputeTaskEndpoint(Handled):
    def __init__(self, truth, transport, notifier=None):
        super().__init__(truth, "nova-conductor", None)
        self.target = endpoint_target(namespace="compute_task", version="1.25")
        self.transport = transport
        self.sched = client(transport, "scheduler", version="4.5")
        self.notifier = notifier

    def schedule_and_build_instances(self, ctxt, instance_uuid, flavor=None):
        self.record(ctxt, "schedule_and_build_instances", "cast")
        self._build(ctxt, instance_uuid, flavor, [], 1)

    def build_instances(self, ctxt, instance_uuid, flavor=None, exclude=None, attempt=2,
                        exc_reason=None):
        """A compute gave up on a build: schedule it again, away from the hosts tried
        (nova's filter_properties['retry']: the hosts and why the last one failed)."""
        self.record(ctxt, "build_instances", "cast")
        self._build(ctxt, instance_uuid, flavor, exclude or [], attempt, exc_reason)

    def _build(self, ctxt, instance_uuid, flavor, exclude, attempt, exc_reason=None):
        extra = {"flavor": flavor, "exclude": exclude} if flavor or exclude else {}
        if exc_reason:
            extra["exc_reason"] = exc_reason
        outcome, host = timed_call(self.truth, "nova-conductor", self.sched.prepare(timeout=10),
                                   ctxt, "select_destinations",
                                   desc("scheduler", version="4.5"), 10,
                                   instance_uuid=instance_uuid, **extra)
        if outcome != "ok":
            if self.notifier:
                # as nova's set_vm_state_and_notify: the instance goes to ERROR
                self.notifier.error(ctxt, "compute_task.build_instances",
                                    {"instance_id": instance_uuid, "reason": "NoValidHost"})
                self.truth.write(kind="surfaced", service="nova-conductor", pid=os.getpid(),
                                 how="compute_task.build_instances",
                                 cause={"service": "nova-scheduler",
                                        "operation": "scheduler.select_destinations",
                                        "error": "NoValidHost"},
                                 request_id=ctxt.request_id,
                                 global_request_id=ctxt.global_request_id, t=time.time())
            return
        cctx = client(self.transport, "compute", server=host, version="6.0")
        extra = {"flavor": flavor, "attempt": attempt} if flavor else {}
        timed_cast(self.truth, "nova-conductor", cctx, ctxt, "build_and_run_instance",
                   desc("compute", server=host, version="6.0"), instance_uuid=instance_uuid,
                   **extra)


class SchedulerEndpoint(Handled):
    def __init__(self, truth, name, hosts, fail_every, rest=None):
        super().__init__(truth, "nova-scheduler", name)
        self.target = endpoint_target(version="4.5")
        self.hosts, self.n, self.fail_every = hosts, 0, fail_every
        self.rest = rest  # placement, with nova's plain keystoneauth adapter

    def no_valid_host(self, ctxt, reason, cause=None):
        self.record(ctxt, "select_destinations", "call",
                    raised={"class": "NoValidHost", "module": "nova.exception"})
        self.truth.write(kind="failure", service="nova-scheduler", pid=os.getpid(),
                         operation="scheduler.select_destinations", error="NoValidHost",
                         cause=cause, request_id=ctxt.request_id,
                         global_request_id=ctxt.global_request_id, t=time.time())
        raise NoValidHost(reason=reason)

    def select_destinations(self, ctxt, instance_uuid, flavor=None, exclude=None,
                            exc_reason=None):
        self.n += 1
        if self.rest:
            r = self.rest.call("placement", "GET", "/allocation_candidates?resources=VCPU:1",
                               global_request_id=ctxt.global_id,
                               route="/allocation_candidates")
            if r.status_code != 200:
                self.no_valid_host(ctxt, "Placement API returned %d." % r.status_code,
                                   {"service": "placement-api",
                                    "operation": "GET /allocation_candidates",
                                    "error": "Internal Server Error"})
        if flavor is not None:
            # only host1 is big enough for the "big" flavor; hosts tried are excluded
            fits = self.hosts[:1] if flavor == "big" else self.hosts
            left = [h for h in fits if h not in (exclude or [])]
            if not left:
                # what exhausted the retries: the failure on the hosts tried
                self.no_valid_host(ctxt, "Exhausted all hosts available for retrying build "
                                         "failures for instance %s." % instance_uuid,
                                   exc_reason)
            host = left[self.n % len(left)]
            if self.rest:
                self.rest.call("placement", "PUT", "/allocations/" + instance_uuid,
                               global_request_id=ctxt.global_id,
                               route="/allocations/{consumer_uuid}",
                               json={"allocations": {}, "consumer_generation": None})
            self.record(ctxt, "select_destinations", "call")
            return host
            self.rest.call("placement", "PUT", "/allocations/" + instance_uuid,
                           global_request_id=ctxt.global_id,
                           route="/allocations/{consumer_uuid}",
                           json={"allocations": {}, "consumer_generation": None})
        if self.fail_every and self.n % self.fail_every == 0:
            self.record(ctxt, "select_destinations", "call",
                        raised={"class": "NoValidHost", "module": "nova.exception"})
            raise NoValidHost(reason="There are not enough hosts available.")
        self.record(ctxt, "select_destinations", "call")
        return self.hosts[self.n % len(self.hosts)]

    def update_instance_info(self, ctxt, host_name, instance_info):
        self.record(ctxt, "update_instance_info", "fanout")


class ComputeEndpoint(Handled):
    MAX_ATTEMPTS = 2

    def __init__(self, truth, host, transport, notifier, faults, rest=None, reschedule=False,
                 versioned=False):
        super().__init__(truth, "nova-compute", host)
        self.target = endpoint_target(version="6.0")
        self.conductor = client(transport, "conductor", version="3.0")
        self.builds = client(transport, "conductor", namespace="compute_task", version="1.25")
        self.notifier, self.faults = notifier, faults
        self.rest = rest  # neutron, through the SDK or python-neutronclient
        self.reschedule = reschedule
        # nova's notification_format: unversioned ("compute.instance.create.end",
        # publisher compute.<host>) or versioned ("instance.create.end", nova-compute:<host>)
        self.versioned = versioned

    def notify(self, ctxt, priority, action, payload):
        event = action if self.versioned else "compute." + action
        getattr(self.notifier, priority)(ctxt, event, payload)

    def build_and_run_instance(self, ctxt, instance_uuid, flavor=None, attempt=1):
        if self.rest:
            port = str(uuid.uuid4())
            r = self.rest.call("neutron", "PUT", "/v2.0/ports/" + port,
                               global_request_id=ctxt.global_id, route="/v2.0/ports/{port_id}",
                               json={"port": {"binding:host_id": self.host,
                                              "device_id": instance_uuid}})
            cause = {"service": "neutron-server", "operation": "PUT /v2.0/ports/{port_id}",
                     "error": "PortBindingFailed"}
            if r.status_code != 200 and self.reschedule and attempt < self.MAX_ATTEMPTS:
                # as nova does on a failed build: create.error, then RescheduledException
                # back to the conductor
                self.record(ctxt, "build_and_run_instance", "cast",
                            raised={"class": "RescheduledException",
                                    "module": "nova.exception"})
                self.notify(ctxt, "error", "instance.create.error",
                            {"instance_id": instance_uuid, "port_id": port})
                self.truth.write(kind="rescheduled", service="nova-compute", host=self.host,
                                 pid=os.getpid(), cause=cause, request_id=ctxt.request_id,
                                 global_request_id=ctxt.global_request_id, t=time.time())
                timed_cast(self.truth, "nova-compute", self.builds, ctxt, "build_instances",
                           desc("conductor", namespace="compute_task", version="1.25"),
                           instance_uuid=instance_uuid, flavor=flavor, exclude=[self.host],
                           attempt=attempt + 1, exc_reason=cause)
                return
            if r.status_code != 200:
                self.truth.write(kind="surfaced", service="nova-compute", pid=os.getpid(),
                                 how="compute.instance.create.error", cause=cause,
                                 request_id=ctxt.request_id,
                                 global_request_id=ctxt.global_request_id, t=time.time())
                self.record(ctxt, "build_and_run_instance", "cast",
                            raised={"class": "PortBindingFailed", "module": "nova.exception"})
                self.notify(ctxt, "error", "instance.create.error",
                            {"instance_id": instance_uuid, "port_id": port})
                raise PortBindingFailed(port_id=port)
        self.record(ctxt, "build_and_run_instance", "cast")
        timed_call(self.truth, "nova-compute", self.conductor.prepare(timeout=10), ctxt,
                   "object_action", desc("conductor", version="3.0"), 10,
                   objname="Instance", objmethod="save")
        self.notify(ctxt, "info", "instance.create.end",
                    {"instance_id": instance_uuid, "state": "active"})

    def attach_interface(self, ctxt, instance_uuid, port_id):
        if "port_binding" in self.faults:
            self.record(ctxt, "attach_interface", "call",
                        raised={"class": "PortBindingFailed", "module": "nova.exception"})
            self.notify(ctxt, "error", "instance.interface_attach.error",
                        {"instance_id": instance_uuid, "port_id": port_id})
            raise PortBindingFailed(port_id=port_id)
        self.record(ctxt, "attach_interface", "call")
        return {"port_id": port_id}

    def get_console_output(self, ctxt, instance_uuid, tail_length=None):
        if "value_error" in self.faults:
            self.record(ctxt, "get_console_output", "call",
                        raised={"class": "ValueError", "module": "builtins"})
            raise ValueError("console log is not available")
        self.record(ctxt, "get_console_output", "call")
        return "login: " * 10

    def slow_op(self, ctxt, secs):
        self.record(ctxt, "slow_op", "call", secs=secs)
        time.sleep(secs)
        return {"slept": secs}


def run_service(args):
    import oslo_messaging
    setup_logging()
    truth = Truth(args.truth)
    conf, transport, url = make_conf(args)
    ntransport = oslo_messaging.get_notification_transport(conf, url=url)
    faults = set(filter(None, (args.faults or "").split(",")))
    servers = []
    stop = threading.Event()
    rest_faults = dict((k, int(v)) for k, v in
                       (f.split("=") for f in filter(None, (args.rest_faults or "").split(","))))
    if args.role in REST_ROLES:
        run_api(args, truth, transport, rest_faults, stop)
        servers = []
    elif args.role == "nova-conductor":
        notifier = oslo_messaging.Notifier(ntransport, publisher_id="conductor." + args.host,
                                           driver="messagingv2", topics=["notifications"])
        eps = [ConductorEndpoint(truth), ComputeTaskEndpoint(truth, transport, notifier)]
        target = oslo_messaging.Target(topic="conductor", server=args.host)
        servers.append(oslo_messaging.get_rpc_server(transport, target, eps,
                                                     executor="threading",
                                                     serializer=ContextSerializer()))
    elif args.role == "nova-scheduler":
        rest = None
        if args.rest:
            import restapis
            rest = restapis.service_client(truth, "nova-scheduler", FAKE_TOKEN_PREFIX)
        ep = SchedulerEndpoint(truth, args.host, args.hosts.split(","),
                               int(args.fail_every or 0), rest)
        target = oslo_messaging.Target(topic="scheduler", server=args.host)
        servers.append(oslo_messaging.get_rpc_server(transport, target, [ep],
                                                     executor="threading",
                                                     serializer=ContextSerializer()))
    elif args.role == "nova-compute":
        # host2 sends nova's versioned notifications in the failure scenario
        versioned = args.reschedule and args.host == "host2"
        notifier = oslo_messaging.Notifier(
            ntransport, driver="messagingv2",
            publisher_id=("nova-compute:" if versioned else "compute.") + args.host,
            topics=["versioned_notifications" if versioned else "notifications"])
        rest = None
        if args.rest:
            import restapis
            # a newer nova talks to neutron through the SDK under its own app name, an
            # older one through python-neutronclient: one of each
            form = (dict(app_name="nova-compute", additional=[("openstacksdk", "4.22.0")])
                    if args.host == "host1" else dict(exact="python-neutronclient"))
            rest = restapis.service_client(truth, "nova-compute", FAKE_TOKEN_PREFIX, **form)
        ep = ComputeEndpoint(truth, args.host, transport, notifier, faults, rest,
                             reschedule=args.reschedule, versioned=versioned)
        target = oslo_messaging.Target(topic="compute", server=args.host)
        servers.append(oslo_messaging.get_rpc_server(transport, target, [ep],
                                                     executor="threading",
                                                     serializer=ContextSerializer()))
        if args.longtask:
            servers.append(longtask_server(transport, ep))
    elif args.role == "ceilometer-agent-notification":
        servers.append(notification_listener(truth, ntransport))
    else:
        raise SystemExit("unknown role " + args.role)

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for s in servers:
        s.start()
    truth.write(kind="process", service=args.role, host=args.host, pid=os.getpid(),
                t=time.time())
    with open(args.ready, "w") as f:
        f.write(str(os.getpid()))

    # computes report to every scheduler by fanout, like nova's update_instance_info
    sched_fanout = client(transport, "scheduler", version="4.5", fanout=True)
    ctxt = user_context()
    next_report = time.time() + 1.0
    while not stop.wait(0.05):
        if args.longtask_file and os.path.exists(args.longtask_file):
            # a second consumer of the long-task queue joins on the driver's word
            args.longtask_file = None
            extra = longtask_server(transport, ep)
            extra.start()
            servers.append(extra)
            open(args.longtask_ready, "w").close()
        if args.role == "nova-compute" and args.fanout_every and time.time() >= next_report:
            next_report = time.time() + args.fanout_every
            timed_cast(truth, "nova-compute", sched_fanout, ctxt, "update_instance_info",
                       desc("scheduler", version="4.5", fanout=True, exchange="scheduler_fanout"),
                       host_name=args.host, instance_info={})
    for s in servers:
        s.stop()
        s.wait()
    transport.cleanup()
    ntransport.cleanup()


def longtask_server(transport, compute_endpoint):
    """Consumes the shared "longtask" topic queue (and its own longtask.<host>): the broker
    hands each call to the topic to one of its consumers, and gives what a dead one left
    unacked to another."""
    import oslo_messaging
    target = oslo_messaging.Target(topic="longtask", server=compute_endpoint.host)
    return oslo_messaging.get_rpc_server(transport, target, [compute_endpoint],
                                         executor="threading", serializer=ContextSerializer())


class NotificationEndpoint:
    """ceilometer-like: consumes notifications, sending each back once (REQUEUE) before it
    takes it, so that the broker redelivers every notification."""

    def __init__(self, truth):
        import oslo_messaging
        self.truth, self.seen = truth, set()
        self.requeue = oslo_messaging.NotificationResult.REQUEUE

    def _any(self, ctxt, publisher_id, event_type, payload, metadata):
        mid = metadata.get("message_id")
        first = mid not in self.seen
        self.seen.add(mid)
        self.truth.write(kind="notified", service="ceilometer-agent-notification",
                         pid=os.getpid(), event_type=event_type, message_id=mid,
                         requeued=first, t=time.time())
        return self.requeue if first else None

    info = warn = error = critical = audit = _any


def notification_listener(truth, ntransport):
    import oslo_messaging
    targets = [oslo_messaging.Target(topic="notifications")]
    return oslo_messaging.get_notification_listener(
        ntransport, targets, [NotificationEndpoint(truth)], executor="threading",
        allow_requeue=True)


REST_ROLES = ("keystone", "glance-api", "placement-api", "neutron-server", "nova-api")


def run_api(args, truth, transport, faults, stop):
    """One REST API process (restapis.py) on its usual port."""
    import restapis
    tp = FAKE_TOKEN_PREFIX
    if args.role == "keystone":
        app = restapis.Keystone(truth, tp)
        service = "keystone"
    elif args.role == "glance-api":
        app = restapis.Glance("glance", truth,
                              restapis.middleware_client(truth, "glance-api", "glance", tp))
        service = "glance"
    elif args.role == "placement-api":
        app = restapis.Placement("placement", truth,
                                 restapis.middleware_client(truth, "placement-api", "placement",
                                                            tp), faults)
        service = "placement"
    elif args.role == "neutron-server":
        app = restapis.Neutron(truth,
                               restapis.middleware_client(truth, "neutron-server", "neutron", tp),
                               restapis.service_client(truth, "neutron-server", tp,
                                                       app_name="neutron-server",
                                                       client_name="python-novaclient"),
                               faults, flaky_host=args.flaky_host)
        service = "neutron"
    else:
        conductor = client(transport, "conductor", namespace="compute_task", version="1.25")

        def api_context(local, glob):
            from oslo_context import context
            return context.RequestContext(user_id="u-demo", project_id="p-demo",
                                          auth_token=tp + uuid.uuid4().hex, roles=["member"],
                                          request_id=local, global_request_id=glob)

        def build(local, glob, sid, flavor):
            extra = {"flavor": flavor} if args.quota else {}
            timed_cast(truth, "nova-api", conductor, api_context(local, glob),
                       "schedule_and_build_instances",
                       desc("conductor", namespace="compute_task", version="1.25"),
                       instance_uuid=sid, **extra)

        def console(local, glob, host):
            cctx = client(transport, "compute", server=host, version="6.0").prepare(timeout=2)
            outcome, _ = timed_call(truth, "nova-api", cctx, api_context(local, glob),
                                    "get_console_output",
                                    desc("compute", server=host, version="6.0"), 2,
                                    instance_uuid=str(uuid.uuid4()))
            return outcome == "ok", "MessagingTimeout" if outcome == "timeout" else outcome

        legacy = {"9d6f0b8e-1c2a-4b7e-9f3d-5a4c3b2a1f00": "host3"} if args.quota else None
        app = restapis.Nova(truth, restapis.middleware_client(truth, "nova-api", "nova", tp),
                            restapis.service_client(truth, "nova-api", tp,
                                                    exact="python-glanceclient"),
                            restapis.service_client(truth, "nova-api", tp, app_name="nova-api",
                                                    app_version="32.0.0",
                                                    client_name="python-neutronclient",
                                                    client_version="11.2.0"),
                            build,
                            placement=restapis.service_client(truth, "nova-api", tp)
                            if args.quota else None,
                            console=console, legacy=legacy)
        service = "nova"
    restapis.serve(service, app, stop)


# What users call the APIs with, by the User-Agent each sends: the CLI (its app name
# before osc-lib's and the SDK's), a Go client, Terraform (which prepends itself to
# gophercloud's), curl.
USER_TOOLS = [
    dict(app_name="python-openstackclient", app_version="7.1.2",
         additional=[("osc-lib", "3.1.0"), ("openstacksdk", "4.0.1")]),
    dict(exact="gophercloud/2.0.0"),
    dict(exact="HashiCorp Terraform/1.9.8 (+https://www.terraform.io) Terraform Plugin "
               "SDK/2.10.1 terraform-provider-openstack/3.0.0 gophercloud/2.0.0"),
    dict(exact="curl/8.5.0"),
]


def run_user(args):
    """The user: an SDK session for keystone and glance, novaclient for nova, and now and
    then another tool."""
    import restapis
    truth = Truth(args.truth)
    truth.write(kind="process", service="openstack", host=None, pid=os.getpid(), t=time.time())
    sdk = restapis.Client(truth, "openstack", FAKE_TOKEN_PREFIX, app_name="openstacksdk")
    token = sdk.login("demo")
    nova = restapis.Client(truth, "openstack", FAKE_TOKEN_PREFIX, exact="python-novaclient")
    nova.token = token
    tools = [restapis.Client(truth, "openstack", FAKE_TOKEN_PREFIX, **form)
             for form in USER_TOOLS]
    for t in tools:
        t.token = token
    image = str(uuid.uuid4())
    if args.failures:
        user_failures(nova, image, args.calls)
        return
    for i in range(args.calls):
        # every other boot carries a global request id, one a malformed one (dropped by
        # oslo.middleware, so nova starts a new chain)
        gid = "req-" + str(uuid.uuid4()) if i % 2 else None
        if i == 2:
            gid = "not-a-request-id"
        r = nova.call("nova", "POST", "/v2.1/servers", global_request_id=gid,
                      route="/v2.1/servers",
                      json={"server": {"name": "vm%d" % i, "imageRef": image,
                                       "flavorRef": "1"}})
        sid = (r.json().get("server") or {}).get("id") if r.status_code == 202 else None
        if sid:
            nova.call("nova", "GET", "/v2.1/servers/" + sid, route="/v2.1/servers/{server_id}")
        if i % 4 == 3:
            nova.call("nova", "GET", "/v2.1/servers/" + str(uuid.uuid4()),
                      route="/v2.1/servers/{server_id}")
        if i % 3 == 0:
            nova.call("nova", "GET", "/v2.1/flavors/detail", route="/v2.1/flavors/detail")
            sdk.call("glance", "GET", "/v2/images?limit=20", route="/v2/images")
            tools[(i // 3) % len(tools)].call("nova", "GET", "/v2.1/flavors/detail",
                                              route="/v2.1/flavors/detail")
        time.sleep(0.05)
    # a token keystone never issued: nova answers 401
    stale = restapis.Client(truth, "openstack", FAKE_TOKEN_PREFIX, exact="python-novaclient")
    stale.token = FAKE_TOKEN_PREFIX + "revoked" + uuid.uuid4().hex
    stale.call("nova", "GET", "/v2.1/flavors/detail", route="/v2.1/flavors/detail")
    time.sleep(2.0)  # let the builds the casts started finish


def user_failures(nova, image, n):
    """Boots of two sizes (only host1 fits "big"; host1 cannot bind ports), and console
    output of an old server on host3, whose compute is gone."""
    legacy = None
    for i in range(n):
        flavor = "big" if i % 4 == 1 else "small"
        r = nova.call("nova", "POST", "/v2.1/servers", route="/v2.1/servers",
                      json={"server": {"name": "vm%d" % i, "imageRef": image,
                                       "flavorRef": flavor}})
        if r.status_code == 202:
            sid = r.json()["server"]["id"]
            nova.call("nova", "GET", "/v2.1/servers/" + sid, route="/v2.1/servers/{server_id}")
        if i % 5 == 3:
            if legacy is None:
                d = nova.call("nova", "GET", "/v2.1/servers/detail", route="/v2.1/servers/detail")
                legacy = [s["id"] for s in d.json()["servers"]
                          if s["OS-EXT-SRV-ATTR:host"] == "host3"][0]
            nova.call("nova", "POST", "/v2.1/servers/%s/action" % legacy,
                      route="/v2.1/servers/{server_id}/action",
                      json={"os-getConsoleOutput": {"length": 50}})
        time.sleep(0.1)
    time.sleep(3.0)  # reschedules and error notifications land


# --------------------------------------------------------------------------------------
# the user side (nova-api): one function per scenario
# --------------------------------------------------------------------------------------
def api_builds(truth, transport, n, pause=0.05):
    conductor = client(transport, "conductor", namespace="compute_task", version="1.25")
    for _ in range(n):
        ctxt = user_context()
        timed_cast(truth, "nova-api", conductor, ctxt, "schedule_and_build_instances",
                   desc("conductor", namespace="compute_task", version="1.25"),
                   instance_uuid=str(uuid.uuid4()))
        time.sleep(pause)


def api_direct_calls(truth, transport, n, hosts, method="get_console_output", timeout=10,
                     pause=0.02, **kwargs):
    for i in range(n):
        host = hosts[i % len(hosts)]
        ctxt = user_context(global_request_id="req-" + str(uuid.uuid4()) if i % 2 else None)
        cctx = client(transport, "compute", server=host, version="6.0").prepare(timeout=timeout)
        args = dict(kwargs) or {"instance_uuid": str(uuid.uuid4())}
        if method == "attach_interface":
            args["port_id"] = str(uuid.uuid4())
        timed_call(truth, "nova-api", cctx, ctxt, method,
                   desc("compute", server=host, version="6.0"), timeout, **args)
        time.sleep(pause)


def ask(work, what, timeout=60):
    """Asks the orchestrator for `what` (a file it watches) and waits until it is done."""
    open(os.path.join(work, what), "w").close()
    wait_for(os.path.join(work, what + "-done"), what, timeout)


def modern_driver(truth, transport, n, args):
    """The healthy mix on quorum queues, queue-manager names and stream fanouts, then:
    a scheduler that attaches late to the fanout stream (reads its last chunk), a broker
    cancel (a consumer's queue deleted), and a call redelivered by the quorum queue to a
    second consumer after the first died holding it unacked."""
    work = args.work
    api_builds(truth, transport, n)
    api_direct_calls(truth, transport, n, ["host1", "host2"])
    api_direct_calls(truth, transport, max(1, n // 4), ["host1", "host2"], "attach_interface")
    ask(work, "start-sched3")
    time.sleep(2.5)  # fanouts reach all three schedulers
    # the broker cancels sched1's consumer of its own queue; oslo reconnects and declares
    # it again (same connection_name)
    import kombu
    with kombu.Connection("amqp://guest:guest@%s/%s" % (brokers(args)[0], args.vhost)) as conn:
        conn.default_channel.queue_delete("scheduler.sched1")
    truth.write(kind="queue_deleted", queue="scheduler.sched1", t=time.time())
    time.sleep(3.0)
    for _ in range(3):
        ctxt = user_context()
        cctx = client(transport, "scheduler", server="sched1", version="4.5").prepare(timeout=10)
        timed_call(truth, "nova-api", cctx, ctxt, "select_destinations",
                   desc("scheduler", server="sched1", version="4.5"), 10,
                   instance_uuid=str(uuid.uuid4()))
    # a long task on host1, then host1 freezes (SIGSTOP: it reads nothing more, so what the
    # broker sends it stays unacked), a second task goes to it all the same, host2 starts
    # consuming the queue and host1 dies: the broker redelivers the second task to host2;
    # the first never gets an answer
    lt = client(transport, "longtask", version="6.0")
    first = threading.Thread(target=timed_call, args=(
        truth, "nova-api", lt.prepare(timeout=4), user_context(), "slow_op",
        desc("longtask", version="6.0"), 4), kwargs={"secs": 6})
    first.start()
    time.sleep(0.3)
    ask(work, "stop-host1")
    second = threading.Thread(target=timed_call, args=(
        truth, "nova-api", lt.prepare(timeout=10), user_context(), "slow_op",
        desc("longtask", version="6.0"), 10), kwargs={"secs": 0.1})
    second.start()
    time.sleep(0.5)
    ask(work, "longtask-host2")
    ask(work, "kill-host1")
    first.join()
    second.join()
    api_direct_calls(truth, transport, 3, ["host2"])
    api_builds(truth, transport, 2)


def run_driver(args):
    setup_logging()
    truth = Truth(args.truth)
    conf, transport, url = make_conf(args)
    truth.write(kind="process", service="nova-api", host=None, pid=os.getpid(), t=time.time())
    sc, n = args.scenario, args.calls
    if args.go_file:  # mid-stream: phase 1 before the capture starts
        api_direct_calls(truth, transport, 5, ["host1"])
        slow = threading.Thread(target=api_direct_calls,
                                args=(truth, transport, 1, ["host1"], "slow_op", 10),
                                kwargs={"secs": 1.5})
        slow.start()
        open(args.phase1_file, "w").close()
        while not os.path.exists(args.go_file):
            time.sleep(0.02)
        time.sleep(0.3)
    if sc in ("healthy", "midstream", "load"):
        pause = 0.0 if sc == "load" else 0.05  # load: as fast as the real library goes
        api_builds(truth, transport, n, pause=pause)
        api_direct_calls(truth, transport, n, ["host1", "host2"], pause=pause / 2)
        api_direct_calls(truth, transport, max(1, n // 4), ["host1", "host2"], "attach_interface",
                         pause=pause / 2)
    elif sc == "remote_error":
        api_builds(truth, transport, n)          # the scheduler fails every 3rd placement
        api_direct_calls(truth, transport, n // 2, ["host2"], "attach_interface")
        api_direct_calls(truth, transport, n // 2, ["host2"], "get_console_output")
        api_direct_calls(truth, transport, n // 2, ["host1"], "get_console_output")
        # a method the endpoint does not have: oslo answers NoSuchMethod
        api_direct_calls(truth, transport, 2, ["host1"], "no_such_method",
                         instance_uuid="x")
    elif sc in ("modern", "failover"):
        modern_driver(truth, transport, n, args)
    elif sc == "dead_consumer":
        api_direct_calls(truth, transport, 3, ["host1"])
        # host3's queue exists (its compute went away), host9 never had one
        api_direct_calls(truth, transport, 2, ["host3"], timeout=2)
        api_direct_calls(truth, transport, 2, ["host9"], timeout=2)
        cctx = client(transport, "compute", server="host3", version="6.0")
        for _ in range(3):
            ctxt = user_context()
            timed_cast(truth, "nova-api", cctx, ctxt, "build_and_run_instance",
                       desc("compute", server="host3", version="6.0"),
                       instance_uuid=str(uuid.uuid4()))
        api_direct_calls(truth, transport, 3, ["host1"])
    elif sc == "slow_server":
        api_direct_calls(truth, transport, 3, ["host1"])
        # slower than the caller's timeout: MessagingTimeout, then a late reply
        api_direct_calls(truth, transport, 2, ["host1"], "slow_op", 1, secs=2)
        # slow but within the timeout, with a call monitor: ending:false heartbeats
        ctxt = user_context()
        cctx = client(transport, "compute", server="host1", version="6.0").prepare(
            timeout=10, call_monitor_timeout=2)
        timed_call(truth, "nova-api", cctx, ctxt, "slow_op",
                   desc("compute", server="host1", version="6.0"), 10, secs=3)
        api_direct_calls(truth, transport, 3, ["host1"])
    else:
        raise SystemExit("unknown scenario " + sc)
    time.sleep(1.5 if sc != "slow_server" else 3.5)  # let late replies and fanouts land
    transport.cleanup()


def run_orphan_caller(args):
    """A caller that times out, then vanishes with its reply queue (a crashed nova-api):
    the server's reply is returned by the broker (312 NO_ROUTE) and retried."""
    import oslo_messaging
    setup_logging()
    truth = Truth(args.truth)
    conf, transport, url = make_conf(args)
    ctxt = user_context()
    cctx = client(transport, "compute", server="host1", version="6.0").prepare(timeout=1)
    timed_call(truth, "nova-api", cctx, ctxt, "slow_op",
               desc("compute", server="host1", version="6.0"), 1, secs=2.5)
    import kombu
    with kombu.Connection("amqp://guest:guest@%s/%s" % (brokers(args)[0], args.vhost)) as conn:
        reply_q = json.loads(open(args.truth).readlines()[-1])["reply_q"]
        conn.default_channel.queue_delete(reply_q)
    truth.write(kind="reply_queue_deleted", queue=reply_q, t=time.time())
    os._exit(0)


# --------------------------------------------------------------------------------------
# the orchestrator: vhost, tcpdump, processes, truth
# --------------------------------------------------------------------------------------
SCENARIOS = {
    "healthy": "builds (cast→call→cast→call+notification), direct calls to 2 computes, "
               "fanouts to 2 schedulers",
    "remote_error": "NoValidHost from the scheduler, PortBindingFailed and ValueError from "
                    "computes, NoSuchMethod",
    "dead_consumer": "calls and casts to a compute whose queue has no consumer, calls to a "
                     "topic with no queue: timeouts, casts never consumed",
    "slow_server": "a server slower than the caller's timeout (late replies), call-monitor "
                   "heartbeats, a caller that dies (unroutable replies, 312 NO_ROUTE)",
    "midstream": "the capture starts after every connection is up and while a call is in "
                 "flight",
    "load": "the healthy mix, many times over (benchmark captures)",
    "modern": "the healthy mix with oslo.messaging's modern RabbitMQ options all on (quorum "
              "and transient quorum queues, queue-manager names, stream fanout, "
              "cancel-on-failover); a scheduler attaching late to the fanout stream, a "
              "broker consumer cancel, a call redelivered to a second consumer after the "
              "first died holding it, notifications requeued by their consumer",
    "cluster": "the failures scenario on a real 3-node RabbitMQ cluster (scripts/"
               "rabbitmq-cluster: 5682-5684, quorum queues); every process lists all three "
               "nodes, one capture per node (SCENARIO-a/b/c.pcap) and one of the API ports "
               "(SCENARIO-api.pcap), as a sidecar on each node sees them",
    "failover": "the modern scenario's story on classic queues with "
                "enable_cancel_on_failover (consumers declared with "
                "x-cancel-on-ha-failover)",
    "failures": "the REST cloud failing: quota counted in placement fails (nova-api 500), a "
                "host that cannot bind ports (builds rescheduled: masked), instances whose "
                "ports bind nowhere (rescheduled, then ERROR), a flavor only that host fits "
                "(reschedule runs out of hosts: NoValidHost), console output of a server on "
                "a dead compute (RPC timeout, nova-api 500)",
    "rest": "a user boots servers through real WSGI APIs (keystone, nova-api, glance, "
            "neutron, placement; oslo.middleware request ids, keystoneauth1 clients): nova-api "
            "casts to the conductor, the scheduler calls placement (every 4th: 500), computes "
            "bind ports in neutron (every 3rd: 500 PortBindingFailed)",
}


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def spawn(role, argv, log):
    return subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv + ["--as", role],
                            stdout=log, stderr=log)


def wait_for(path, what, timeout=30, procs=()):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        for p in procs:
            if p.poll() is not None:
                raise SystemExit("%s: a process exited early (code %s)" % (what, p.returncode))
        if time.time() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.05)


def serve_requests(work, service, hosts_procs, procs):
    """What the driver asks of the orchestrator (modern scenario), by request file."""
    def done(what):
        os.unlink(os.path.join(work, what))
        open(os.path.join(work, what + "-done"), "w").close()

    if os.path.exists(os.path.join(work, "start-sched3")):
        p, ready = service("nova-scheduler", "sched3", "--hosts", "host1,host2")
        wait_for(ready, "sched3", procs=[p])
        done("start-sched3")
    if os.path.exists(os.path.join(work, "stop-host1")):
        hosts_procs["host1"].send_signal(signal.SIGSTOP)
        done("stop-host1")
    if os.path.exists(os.path.join(work, "kill-host1")):
        victim = hosts_procs["host1"]
        victim.kill()  # SIGKILL: what it held unacked goes back to the queue
        victim.wait(timeout=20)
        procs.remove(victim)
        done("kill-host1")


API_PORTS_LOCK = "/tmp/stacktap-minicloud-api-ports.lock"


def hold_api_ports(timeout=900):
    """The APIs listen on their fixed, well-known ports (stacktap knows services by port), so
    two recordings with REST at once would collide: the second waits for the first here. The
    lock is released by the kernel when this process ends, however it ends."""
    import fcntl
    lock = open(API_PORTS_LOCK, "a")
    deadline = time.time() + timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > deadline:
                raise SystemExit("another recording held %s for %d s" % (API_PORTS_LOCK, timeout))
            time.sleep(0.2)
    import restapis
    for service, port in restapis.PORTS.items():
        holder = port_holder(port, wait=20)
        if holder:
            raise SystemExit("port %d (%s) is busy: %s" % (port, service, holder))
    return lock


def port_holder(port, wait):
    """Who listens on loopback `port` (None once it is free), waiting up to `wait` s for a
    previous run's server to go away."""
    import socket
    deadline = time.time() + wait
    while True:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return None
        except OSError as e:
            err = e
        finally:
            s.close()
        if time.time() > deadline:
            ss = subprocess.run(["ss", "-Hltnp", "sport = :%d" % port],
                                capture_output=True, text=True)
            return "%s; ss says: %s" % (err, ss.stdout.strip() or ss.stderr.strip() or "nothing")
        time.sleep(0.2)


def record(args):
    scenario = args.scenario
    if scenario not in SCENARIOS:
        raise SystemExit("unknown scenario %r; see 'minicloud.py list'" % scenario)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, ".work-" + scenario)
    os.makedirs(work, exist_ok=True)
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    pcap = os.path.join(args.out, scenario + ".pcap")
    truth_path = os.path.join(args.out, scenario + ".truth.jsonl")
    vhost = "minicloud-%s-%d" % (scenario, os.getpid())
    cluster = scenario == "cluster"
    ctl = ["rabbitmqctl", "-q"] + (["-n", "stacktap-a@localhost"] if cluster else [])
    sh(*ctl, "add_vhost", vhost)
    sh(*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    log = open(os.path.join(args.out, scenario + ".log"), "w")
    procs, tcpdumps = [], []
    common = ["--vhost", vhost]
    if cluster:
        common += ["--brokers", ",".join(CLUSTER.values())]
    os.environ["MINICLOUD_LOCKS"] = work  # the queue manager's file locks
    if scenario in SCENARIO_OPTIONS:
        common += ["--oslo-options", SCENARIO_OPTIONS[scenario]]
    modern = scenario in ("modern", "failover")

    def start_capture():
        """One tcpdump on lo per vantage point: the broker (or each cluster node) and, in
        the cluster scenario, the API ports apart, as one sidecar per node would see them."""
        api_ports = []
        if scenario in ("rest", "failures", "cluster"):
            import restapis
            api_ports = [str(p) for p in restapis.PORTS.values()]
        if cluster:
            points = [(os.path.join(args.out, "%s-%s.pcap" % (scenario, n)), [b.split(":")[1]])
                      for n, b in CLUSTER.items()]
            points.append((os.path.join(args.out, scenario + "-api.pcap"), api_ports))
        else:
            points = [(pcap, [BROKER.split(":")[1]] + api_ports)]
        for path, ports in points:
            t = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-s", "0", "-w", path,
                                  " or ".join("tcp port " + p for p in ports)],
                                 stderr=subprocess.PIPE, text=True)
            line = t.stderr.readline()  # "listening on lo ..." once the filter is live
            if "listening" not in line:
                raise SystemExit("tcpdump did not start: " + line)
            tcpdumps.append(t)
        time.sleep(0.2)

    def service(role, host, *extra):
        ready = os.path.join(work, "ready-%s-%s" % (role, host))
        truth = os.path.join(work, "truth-%s-%s.jsonl" % (role, host))
        p = spawn(role, ["service", "--role", role, "--host", host, "--truth", truth,
                         "--ready", ready] + common + list(extra), log)
        procs.append(p)
        return p, ready

    try:
        midstream = scenario == "midstream"
        failures = scenario in ("failures", "cluster")
        rest = scenario == "rest" or failures
        ports_lock = hold_api_ports() if rest else None  # noqa: F841 (held while we run)
        if not midstream:
            start_capture()
        hosts = "host1,host2"
        faults = {"remote_error": {"host2": "port_binding,value_error"}}.get(scenario, {})
        readies = []
        if rest:
            # keystone first: every other service logs in to it when it starts
            r = service("keystone", "api")
            wait_for(r[1], "keystone", procs=procs)
            api_faults = {"placement-api": "placement_500=4", "neutron-server": "port_binding=3"}
            if failures:
                api_faults = {"placement-api": "usages_500=5",
                              "neutron-server": "doomed_instance=4"}
            for role in ("glance-api", "placement-api", "neutron-server", "nova-api"):
                extra = ["--rest-faults", api_faults[role]] if role in api_faults else []
                if failures and role == "neutron-server":
                    extra += ["--flaky-host", "host1"]
                if failures and role == "nova-api":
                    extra += ["--quota"]
                readies.append(service(role, "api", *extra)[1])
        readies.append(service("nova-conductor", "cond1")[1])
        for s in ("sched1", "sched2")[:1 if rest else 2]:
            extra = ["--hosts", hosts]
            if scenario == "remote_error":
                extra += ["--fail-every", "3"]
            if rest:
                extra += ["--rest"]
            readies.append(service("nova-scheduler", s, *extra)[1])
        hosts_procs = {}
        for h in ("host1", "host2"):
            extra = ["--fanout-every", "2"] + (["--rest"] if rest else [])
            if modern and h == "host1":
                extra += ["--longtask"]
            if modern and h == "host2":
                extra += ["--longtask-file", os.path.join(work, "longtask-host2"),
                          "--longtask-ready", os.path.join(work, "longtask-host2-done")]
            if failures:
                extra += ["--reschedule"]
            if h in faults:
                extra += ["--faults", faults[h]]
            if scenario == "slow_server":
                extra += ["--reply-retry", "3"]
            p, r = service("nova-compute", h, *extra)
            hosts_procs[h] = p
            readies.append(r)
        if modern:
            readies.append(service("ceilometer-agent-notification", "ctl1")[1])
        if scenario in ("dead_consumer", "failures"):
            p, r = service("nova-compute", "host3")
            wait_for(r, "host3", procs=[p])
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
            procs.remove(p)
        for r in readies:
            wait_for(r, r, procs=procs)
        driver_truth = os.path.join(work, "truth-nova-api.jsonl")
        dargs = ["driver", "--scenario", scenario, "--calls", str(args.calls),
                 "--truth", driver_truth] + common
        go = os.path.join(work, "go")
        if midstream:
            phase1 = os.path.join(work, "phase1")
            dargs += ["--go-file", go, "--phase1-file", phase1]
        if rest:
            dargs = ["user", "--calls", str(args.calls), "--truth", driver_truth]
            if failures:
                dargs += ["--failures"]
        if modern:
            dargs += ["--work", work]
        driver = spawn("openstack" if rest else "nova-api", dargs, log)
        if midstream:
            wait_for(phase1, "phase 1", procs=[driver])
            start_capture()
            open(go, "w").close()
        if scenario == "slow_server":
            orphan = spawn("nova-api", ["orphan", "--truth",
                                        os.path.join(work, "truth-orphan.jsonl")] + common, log)
            orphan.wait(timeout=60)
        # 6000 load calls take about a minute here: a bigger --calls gets longer
        deadline = time.time() + 600 + 0.05 * args.calls
        while driver.poll() is None:
            if time.time() > deadline:
                driver.kill()
                raise SystemExit("driver timed out; see %s.log" % scenario)
            serve_requests(work, service, hosts_procs, procs)
            time.sleep(0.05)
        if driver.returncode != 0:
            raise SystemExit("driver failed; see %s.log" % scenario)
        if scenario == "slow_server":
            time.sleep(4)  # the 312 retry storm lasts kombu_missing_consumer_retry_timeout
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        time.sleep(0.5)
        for t in tcpdumps:
            t.send_signal(signal.SIGINT)
            t.wait(timeout=20)
        sh(*ctl, "delete_vhost", vhost, check=False)
        # the queue manager's counters (named <host>_<process>_qmanager)
        for f in glob.glob("/dev/shm/*_qmanager"):
            if os.path.basename(f).split("_")[0] in ("api", "cond1", "sched1", "sched2",
                                                      "sched3", "host1", "host2", "ctl1"):
                os.unlink(f)
    records = []
    for name in sorted(os.listdir(work)):
        if name.startswith("truth-"):
            records += [json.loads(line) for line in open(os.path.join(work, name))]
    records.sort(key=lambda r: r.get("t_start", r.get("t", 0)))
    with open(truth_path, "w") as f:
        f.write(json.dumps({"kind": "scenario", "scenario": scenario,
                            "description": SCENARIOS[scenario],
                            "token_prefix": FAKE_TOKEN_PREFIX,
                            "password_prefix": "secret-password-",
                            "broker_password": "guest"}) + "\n")
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    for f in os.listdir(work):
        os.unlink(os.path.join(work, f))
    os.rmdir(work)
    captures = [t.args[t.args.index("-w") + 1] for t in tcpdumps]
    print("%s: %s, %s (%d records)" % (
        scenario, ", ".join("%s (%d bytes)" % (c, os.path.getsize(c)) for c in captures),
        truth_path, len(records)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="record SCENARIO into DIR")
    r.add_argument("scenario")
    r.add_argument("--out", required=True)
    r.add_argument("--calls", type=int, default=12)
    sub.add_parser("list", help="list the scenarios")
    s = sub.add_parser("service")
    for a in ("--role", "--host", "--truth", "--ready", "--vhost"):
        s.add_argument(a, required=True)
    s.add_argument("--hosts", default="host1,host2")
    s.add_argument("--faults")
    s.add_argument("--fail-every")
    s.add_argument("--fanout-every", type=float, default=0)
    s.add_argument("--reply-retry", type=int)
    s.add_argument("--rest", action="store_true", help="call placement / neutron over REST")
    s.add_argument("--rest-faults", help="FAULT=N,...: fail every Nth request of a kind")
    s.add_argument("--reschedule", action="store_true",
                   help="computes send failed builds back to the conductor")
    s.add_argument("--flaky-host", help="neutron: port binding on this host always fails")
    s.add_argument("--quota", action="store_true",
                   help="nova-api counts quota in placement and knows a server on host3")
    s.add_argument("--executor-threads", type=int, help="executor_thread_pool_size")
    s.add_argument("--longtask", action="store_true", help="consume the longtask topic")
    s.add_argument("--longtask-file", help="consume the longtask topic once this exists")
    s.add_argument("--longtask-ready", help="written once consuming the longtask topic")
    u = sub.add_parser("user")
    for a in ("--truth",):
        u.add_argument(a, required=True)
    u.add_argument("--calls", type=int, default=12)
    u.add_argument("--failures", action="store_true")
    d = sub.add_parser("driver")
    for a in ("--scenario", "--truth", "--vhost"):
        d.add_argument(a, required=True)
    d.add_argument("--calls", type=int, default=12)
    d.add_argument("--go-file")
    d.add_argument("--phase1-file")
    d.add_argument("--work", help="the orchestrator's directory, for requests")
    o = sub.add_parser("orphan")
    for a in ("--truth", "--vhost"):
        o.add_argument(a, required=True)
    for p in (s, d, o, u):
        p.add_argument("--as", dest="process_name", required=True)
    for p in (s, d, o):
        p.add_argument("--oslo-options", help="comma list of " + ", ".join(OSLO_OPTIONS))
        p.add_argument("--brokers", help="host:port,... of every RabbitMQ node (a cluster)")
    args = ap.parse_args()
    if getattr(args, "process_name", None):
        # oslo.messaging's connection_name is basename(argv[0]): make it the service name,
        # as it is for a real nova-compute
        sys.argv[0] = args.process_name
    if args.cmd == "list":
        for k, v in SCENARIOS.items():
            print("%-14s %s" % (k, v))
    elif args.cmd == "record":
        record(args)
    elif args.cmd == "service":
        run_service(args)
    elif args.cmd == "driver":
        run_driver(args)
    elif args.cmd == "orphan":
        run_orphan_caller(args)
    elif args.cmd == "user":
        run_user(args)


if __name__ == "__main__":
    main()
