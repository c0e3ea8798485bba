"""An OTLP trace receiver built from the official OpenTelemetry protobufs (PyPI
opentelemetry-proto, grpcio), for stacktap's tests: code nobody here wrote decodes what
stacktap sends.

It serves OTLP/gRPC (TraceService/Export) and OTLP/HTTP-protobuf (POST /v1/traces) on
loopback, writes every span it receives as one JSON line to OUT (ids in hex, attributes
and resource flattened), prints `grpc=PORT http=PORT` once listening, and stops on
SIGTERM or when stdin closes. With --refuse it answers every export UNAVAILABLE / 503.
"""

import argparse
import gzip
import json
import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Sink:
    def __init__(self, path):
        self.lock = threading.Lock()
        self.out = open(path, "a", encoding="utf-8")
        self.requests = 0

    def take(self, req, transport):
        lines = []
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "transport": transport,
                        "scope": ss.scope.name,
                        "resource": resource,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "flags": s.flags,
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": attrs(s.attributes),
                        "events": [{"name": e.name, "t": e.time_unix_nano,
                                    "attributes": attrs(e.attributes)} for e in s.events],
                        "links": [{"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex()}
                                  for l in s.links],
                        "status_code": s.status.code,
                        "status_message": s.status.message,
                    }, sort_keys=True))
        with self.lock:
            self.requests += 1
            for line in lines:
                self.out.write(line + "\n")
            self.out.flush()


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink, refuse):
        self.sink, self.refuse = sink, refuse

    def Export(self, request, context):
        if self.refuse:
            context.abort(grpc.StatusCode.UNAVAILABLE, "refusing, as asked")
        self.sink.take(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def http_handler(sink, refuse):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            if refuse:
                self.send_error(503)
                return
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(415)
                return
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            sink.take(req, "http")
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    return Handler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--refuse", action="store_true")
    args = ap.parse_args()
    sink = Sink(args.out)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         compression=grpc.Compression.NoCompression)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(sink, args.refuse), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), http_handler(sink, args.refuse))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(f"grpc={grpc_port} http={http.server_address[1]}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    server.stop(1)
    http.shutdown()


if __name__ == "__main__":
    main()
