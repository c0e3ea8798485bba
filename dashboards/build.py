#!/usr/bin/env python3
"""Builds the Grafana dashboards in this folder (python3 dashboards/build.py).

One function per dashboard; panels are described by title, PromQL and unit, and laid out
two to a row. `--check` fails if a committed JSON differs from what this script builds
(the test suite runs it). Every dashboard takes its Prometheus data source from the
`${datasource}` variable, so it imports unchanged into any Grafana.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}


def var_datasource():
    return {"name": "datasource", "label": "Prometheus", "type": "datasource",
            "query": "prometheus", "hide": 0, "refresh": 1,
            "options": [], "regex": ""}


def var_query(name, query, label=None):
    return {"name": name, "label": label or name, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name},
            "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "refresh": 2, "sort": 1, "hide": 0, "options": [], "regex": ""}


def var_tracing():
    """The tracing backend stacktap's spans go to (a Tempo data source)."""
    return {"name": "tracing", "label": "Traces (Tempo)", "type": "datasource",
            "query": "tempo", "hide": 0, "refresh": 1, "options": [], "regex": ""}


def var_text(name, label):
    return {"name": name, "label": label, "type": "textbox", "query": "",
            "current": {"text": "", "value": ""}, "hide": 0, "options": []}


# Explore on the tracing data source, searching the spans of one OpenStack request id:
# every span stacktap exports carries the request ids the wire showed (TraceQL), and a
# request's trace id is its req-<uuid> without the dashes (a Jaeger search by trace id).
TRACE_OF_REQUEST = (
    '/explore?schemaVersion=1&orgId=1&panes={"trace":{"datasource":"${tracing}",'
    '"queries":[{"refId":"A","datasource":{"type":"tempo","uid":"${tracing}"},'
    '"queryType":"traceql","query":"{ span.openstack.request_id = \\"${request_id}\\" '
    '|| span.openstack.global_request_id = \\"${request_id}\\" }"}],'
    '"range":{"from":"now-6h","to":"now"}}}')


class Board:
    def __init__(self, uid, title, description, variables=(), links=()):
        self.uid, self.title, self.description = uid, title, description
        self.variables = [var_datasource()] + list(variables)
        self.extra_links = list(links)
        self.panels, self.x, self.y, self.next_id = [], 0, 0, 1

    def row(self, title):
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append({"type": "row", "title": title, "id": self.next_id,
                            "collapsed": False, "panels": [],
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}})
        self.next_id += 1
        self.y += 1

    def panel(self, title, targets, unit="short", kind="timeseries", description="",
              width=12, stack=False):
        """targets: [(expr, legend)]."""
        if self.x + width > 24:
            self.x, self.y = 0, self.y + 8
        p = {"type": kind, "title": title, "description": description, "id": self.next_id,
             "datasource": DS,
             "gridPos": {"x": self.x, "y": self.y, "w": width, "h": 8},
             "targets": [{"datasource": DS, "expr": e, "legendFormat": legend,
                          "refId": chr(ord("A") + i),
                          **({"format": "heatmap"} if kind == "heatmap" else {}),
                          **({"format": "table", "instant": True} if kind == "table" else {})}
                         for i, (e, legend) in enumerate(targets)],
             "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
             "options": {}}
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {
                "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                "stacking": {"mode": "normal" if stack else "none"}}
            p["options"] = {"legend": {"displayMode": "table", "placement": "bottom",
                                       "calcs": ["mean", "max"]},
                            "tooltip": {"mode": "multi"}}
        if kind == "heatmap":
            p["options"] = {"calculate": False, "yAxis": {"unit": unit},
                            "cellGap": 1, "color": {"scheme": "Oranges", "mode": "scheme"}}
        self.next_id += 1
        self.panels.append(p)
        self.x += width
        if self.x >= 24:
            self.x, self.y = 0, self.y + 8

    def json(self):
        return {"uid": self.uid, "title": self.title, "description": self.description,
                "tags": ["stacktap", "openstack"], "timezone": "utc", "editable": True,
                "schemaVersion": 39, "version": 1, "refresh": "30s",
                "time": {"from": "now-1h", "to": "now"},
                "templating": {"list": self.variables},
                "annotations": {"list": []}, "links": [
                    {"title": "stacktap", "type": "dashboards", "tags": ["stacktap"],
                     "asDropdown": True, "icon": "external link", "includeVars": True,
                     "keepTime": True, "targetBlank": False, "tooltip": ""}]
                + self.extra_links,
                "panels": self.panels}


R = "$__rate_interval"


def q(quantile, metric, by, sel=""):
    return ("histogram_quantile(%s, sum by (%s, le) (rate(%s_bucket%s[%s])))"
            % (quantile, by, metric, sel, R))


def rpc_overview():
    b = Board("stacktap-rpc", "stacktap / RPC overview",
              "oslo.messaging RPC rebuilt from the wire: how many, how long, how it ended.",
              [var_query("topic", "label_values(stacktap_rpc_messages_total, topic)")])
    t = '{topic=~"$topic"}'
    b.row("Traffic")
    b.panel("RPC messages/s by topic", [(
        "sum by (topic, type) (rate(stacktap_rpc_messages_total%s[%s]))" % (t, R),
        "{{topic}} {{type}}")], "reqps", stack=True)
    b.panel("Calls waiting for a reply", [(
        "sum by (topic) (stacktap_rpc_in_flight%s)" % t, "{{topic}}")])
    b.row("Reply wait (call publish → reply delivered)")
    b.panel("Reply wait p50 / p99 by topic", [
        (q(0.5, "stacktap_rpc_reply_wait_seconds", "topic", t), "p50 {{topic}}"),
        (q(0.99, "stacktap_rpc_reply_wait_seconds", "topic", t), "p99 {{topic}}")], "s")
    b.panel("Reply wait distribution", [(
        "sum by (le) (rate(stacktap_rpc_reply_wait_seconds_bucket%s[%s]))" % (t, R),
        "{{le}}")], "s", kind="heatmap")
    b.row("Outcomes")
    b.panel("Replies by outcome", [(
        "sum by (outcome) (rate(stacktap_rpc_replies_total%s[%s]))" % (t, R),
        "{{outcome}}")], "reqps", stack=True)
    b.panel("Remote exceptions by class", [(
        "sum by (topic, method, exception) (rate(stacktap_rpc_remote_errors_total%s[%s]))"
        % (t, R), "{{topic}}.{{method}} {{exception}}")], "reqps")
    return b


def queues():
    b = Board("stacktap-queues", "stacktap / per-queue reply wait",
              "Where a caller's wait goes, per target queue: broker queue, server, reply.",
              [var_query("queue", "label_values(stacktap_rpc_queue_reply_wait_seconds_bucket,"
                                  " queue)"),
               var_query("topic", "label_values(stacktap_rpc_messages_total, topic)")])
    b.row("Per queue")
    b.panel("Reply wait p99 by queue", [(
        q(0.99, "stacktap_rpc_queue_reply_wait_seconds", "queue", '{queue=~"$queue"}'),
        "{{queue}}")], "s", width=24)
    b.row("The split, by topic")
    t = '{topic=~"$topic"}'
    b.panel("Time in the broker queue (p50 / p99)", [
        (q(0.5, "stacktap_rpc_queue_wait_seconds", "topic", t), "p50 {{topic}}"),
        (q(0.99, "stacktap_rpc_queue_wait_seconds", "topic", t), "p99 {{topic}}")], "s")
    b.panel("Time in the server (p50 / p99)", [
        (q(0.5, "stacktap_rpc_server_seconds", "topic", t), "p50 {{topic}}"),
        (q(0.99, "stacktap_rpc_server_seconds", "topic", t), "p99 {{topic}}")], "s")
    b.panel("Reply transit (p50 / p99)", [
        (q(0.5, "stacktap_rpc_reply_transit_seconds", "topic", t), "p50 {{topic}}"),
        (q(0.99, "stacktap_rpc_reply_transit_seconds", "topic", t), "p99 {{topic}}")], "s")
    b.panel("Deliveries/s (a fanout counts each copy)", [(
        "sum by (topic, type) (rate(stacktap_rpc_deliveries_total%s[%s]))" % (t, R),
        "{{topic}} {{type}}")], "reqps")
    return b


def failures():
    b = Board("stacktap-rpc-failures", "stacktap / timeouts, late and unroutable replies",
              "Calls that never got their answer, answers that came too late or went nowhere,"
              " messages nobody consumed.")
    b.panel("Timeouts (caller gave up)", [(
        "sum by (topic, method) (increase(stacktap_rpc_timeouts_total[%s]))" % R,
        "{{topic}}.{{method}}")])
    b.panel("Late replies (after the caller's timeout)", [(
        "sum by (topic, method) (increase(stacktap_rpc_late_replies_total[%s]))" % R,
        "{{topic}}.{{method}}")])
    b.panel("Unroutable replies (broker 312 NO_ROUTE)", [(
        "sum by (reply_code) (rate(stacktap_amqp_returns_total[%s]))" % R,
        "{{reply_code}}")], "reqps")
    b.panel("Casts and fanouts nobody consumed", [(
        "sum by (topic, method, type) (increase(stacktap_rpc_undelivered_total[%s]))" % R,
        "{{topic}}.{{method}} {{type}}")])
    b.panel("Channel and connection closes by reply code", [
        ("sum by (reply_code) (increase(stacktap_amqp_channel_closes_total[%s]))" % R,
         "channel {{reply_code}}"),
        ("sum by (reply_code) (increase(stacktap_amqp_connection_closes_total[%s]))" % R,
         "connection {{reply_code}}")])
    b.panel("Call-monitor heartbeats (slow servers still working)", [(
        "sum by (topic, method) (rate(stacktap_rpc_heartbeats_total[%s]))" % R,
        "{{topic}}.{{method}}")], "reqps")
    return b


def rest():
    b = Board("stacktap-rest", "stacktap / REST by service and route",
              "OpenStack API calls between services and from users, rebuilt from the wire.",
              [var_query("service", "label_values(stacktap_http_requests_total, service)")])
    s = '{service=~"$service"}'
    b.panel("Requests/s by service", [(
        "sum by (service) (rate(stacktap_http_requests_total%s[%s]))" % (s, R),
        "{{service}}")], "reqps", stack=True)
    b.panel("5xx ratio by service", [(
        "sum by (service) (rate(stacktap_http_requests_total{service=~\"$service\","
        "code=~\"5..\"}[%s])) / sum by (service) (rate(stacktap_http_requests_total%s[%s]))"
        % (R, s, R), "{{service}}")], "percentunit")
    b.panel("p99 latency by route", [(
        q(0.99, "stacktap_http_request_duration_seconds", "service, method, route", s),
        "{{service}} {{method}} {{route}}")], "s", width=24)
    b.panel("Errors by route and caller", [(
        "sum by (client, service, method, route, code) (increase("
        "stacktap_http_requests_total{service=~\"$service\",code=~\"[45]..\"}[1h])) > 0",
        "")], kind="table", width=24)
    return b


def chains():
    b = Board("stacktap-error-chains", "stacktap / error chains",
              "Failing user requests and their root causes (stacktap rca, over time). "
              "Paste a request id (from stacktap rca, the UI or a service log) into "
              "'Request id' and follow 'Trace of a request' to its trace, from the "
              "spans stacktap exports (--otlp-endpoint).",
              [var_tracing(), var_text("request_id", "Request id")],
              [{"title": "Trace of a request", "type": "link", "icon": "external link",
                "url": TRACE_OF_REQUEST, "targetBlank": True, "keepTime": False,
                "includeVars": False, "asDropdown": False, "tags": [],
                "tooltip": "The spans of the request id in 'Request id', in the tracing data source"}])
    b.panel("User requests failed, by root cause", [(
        "sum by (root_service, root_operation, root_error) (increase("
        "stacktap_error_chains_total[%s]))" % R,
        "{{root_service}} {{root_operation}} → {{root_error}}")], stack=True, width=24)
    b.panel("Top root causes (last hour)", [(
        "topk(10, sum by (root_service, root_operation, root_error) (increase("
        "stacktap_error_chains_total[1h]))) > 0", "")], kind="table")
    b.panel("Where users saw them", [(
        "sum by (origin_service, origin_operation) (increase("
        "stacktap_error_chains_total[1h])) > 0", "")], kind="table")
    b.panel("Failures masked by retries", [(
        "sum by (service, operation, error) (increase(stacktap_masked_failures_total[%s]))"
        % R, "{{service}} {{operation}} {{error}}")], width=24)
    return b


def probe():
    b = Board("stacktap-probe", "stacktap / probe health",
              "Is the probe seeing everything? Drops, gaps, anomalies, evictions, caps.")
    b.panel("Packets/s and bytes/s", [
        ("sum by (instance) (rate(stacktap_packets_total[%s]))" % R, "packets {{instance}}"),
        ("sum by (instance) (rate(stacktap_bytes_total[%s]))" % R, "bytes {{instance}}")])
    b.panel("Packets dropped before stacktap", [(
        "sum by (instance, where) (rate(stacktap_capture_drops_total[%s]))" % R,
        "{{instance}} {{where}}")], "pps")
    b.panel("Bytes lost in TCP gaps", [(
        "sum by (instance) (rate(stacktap_tcp_gap_bytes_total[%s]))" % R, "{{instance}}")],
        "Bps")
    b.panel("Parse anomalies by protocol and kind", [(
        "sum by (protocol, kind) (rate(stacktap_parse_anomalies_total[%s]))" % R,
        "{{protocol}}/{{kind}}")])
    b.panel("Evictions from bounded tables", [(
        "sum by (table) (rate(stacktap_evictions_total[%s]))" % R, "{{table}}")])
    b.panel("Label sets folded by the cardinality caps", [(
        "sum by (family) (increase(stacktap_series_folded_total[%s]))" % R, "{{family}}")])
    b.panel("AMQP frames/s by type", [(
        "sum by (type) (rate(stacktap_amqp_frames_total[%s]))" % R, "{{type}}")], "pps")
    b.panel("AMQP methods/s", [(
        "topk(15, sum by (method) (rate(stacktap_amqp_methods_total[%s])))" % R,
        "{{method}}")], "reqps")
    b.row("A fleet: the collector's probes")
    b.panel("Probes up (0: silent or ended)", [(
        "stacktap_probe_up", "{{probe}}")], "short",
        description="1 while a probe feeds the collector. Silent and not ended: a dead sidecar.")
    b.panel("Seconds since a probe was last heard", [(
        "time() - stacktap_probe_last_seen_seconds", "{{probe}}")], "s")
    b.panel("Observations/s per probe", [(
        "sum by (probe) (rate(stacktap_probe_observations_total[%s]))" % R, "{{probe}}")], "reqps")
    b.panel("Packets dropped, bytes lost in gaps, observations unsent (per probe)", [
        ("sum by (probe) (rate(stacktap_probe_drops_total[%s]))" % R, "drops {{probe}}"),
        ("sum by (probe) (rate(stacktap_probe_tcp_gap_bytes_total[%s]))" % R, "gap bytes {{probe}}"),
        ("sum by (probe) (rate(stacktap_probe_unsent_total[%s]))" % R, "unsent {{probe}}")])
    b.panel("Probe clock offsets", [(
        "stacktap_probe_clock_offset_seconds", "{{probe}}")], "s",
        description="Each probe's clock against the reference probe, estimated from RPC causality.")
    b.panel("Partial view (1: part of the traffic goes by unseen)", [
        ("max by (instance) (stacktap_partial_view)", "{{instance}}"),
        ("sum by (evidence) (rate(stacktap_unseen_total[%s]))" % R, "evidence {{evidence}}")])
    return b


BOARDS = {"rpc-overview.json": rpc_overview, "queues.json": queues,
          "rpc-failures.json": failures, "rest.json": rest, "error-chains.json": chains,
          "probe-health.json": probe}

PROVISIONING = """# Grafana provisioning: copy to /etc/grafana/provisioning/dashboards/ and the JSON files
# beside it to the path below. The dashboards ask for a Prometheus data source.
apiVersion: 1
providers:
  - name: stacktap
    folder: stacktap
    type: file
    disableDeletion: false
    allowUiUpdates: true
    options:
      path: /var/lib/grafana/dashboards/stacktap
"""


def main():
    check = "--check" in sys.argv
    stale = []
    files = {name: json.dumps(f().json(), indent=2, ensure_ascii=False) + "\n"
             for name, f in BOARDS.items()}
    files["provisioning/stacktap.yml"] = PROVISIONING
    for name, text in files.items():
        path = os.path.join(HERE, name)
        if check:
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                stale.append(name)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        sys.exit("dashboards out of date (run python3 dashboards/build.py): " + ", ".join(stale))


if __name__ == "__main__":
    main()
