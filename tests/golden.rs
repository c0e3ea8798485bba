//! Golden tests: stacktap's events on the bundled sample captures against the ground truth
//! the generator's processes recorded while they ran (sampledata/*.truth.jsonl).

mod common;
use common::*;

fn golden(scenario: &str) -> Replayed {
    let dir = repo().join("sampledata");
    let r = replay(&[dir.join(format!("{scenario}.pcap"))]);
    let truth = read_truth(&dir.join(format!("{scenario}.truth.jsonl")));
    let bad = check_against_truth(&r, &truth);
    assert!(
        bad.is_empty(),
        "{scenario}: {} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(
        !r.events_text.contains(TOKEN_PREFIX),
        "{scenario}: a token reached the events"
    );
    assert!(
        !r.metrics.contains(TOKEN_PREFIX),
        "{scenario}: a token reached the metrics"
    );
    assert!(
        !r.events_text.contains("PASSWORD"),
        "{scenario}: broker credentials reached the events"
    );
    r
}

fn count(r: &Replayed, key: &str, value: &str) -> usize {
    r.events.iter().filter(|e| e[key] == value).count()
}

#[test]
fn healthy() {
    let r = golden("healthy");
    assert_eq!(
        count(&r, "outcome", "ok"),
        r.events.iter().filter(|e| e["kind"] == "rpc").count()
    );
    assert_eq!(r.summary.anomalies.len(), 0, "{:?}", r.summary.anomalies);
    // AMQP traffic and probe health are exported, zero drops included
    for series in [
        "stacktap_amqp_methods_total{method=\"basic.publish\"}",
        "stacktap_amqp_frames_total{type=\"content-body\"}",
        "stacktap_capture_drops_total{where=\"kernel\"} 0",
    ] {
        assert!(r.metrics.contains(series), "{series}");
    }
    // per-queue reply wait is exported for every queue that took calls
    for q in ["scheduler", "conductor", "compute.host1", "compute.host2"] {
        assert!(
            r.metrics.contains(&format!(
                "stacktap_rpc_queue_reply_wait_seconds_count{{queue=\"{q}\"}}"
            )),
            "{q}"
        );
    }
}

#[test]
fn remote_error() {
    let r = golden("remote_error");
    for class in [
        "PortBindingFailed",
        "NoValidHost",
        "ValueError",
        "NoSuchMethod",
    ] {
        assert!(
            r.events.iter().any(|e| e["error"]["class"] == class),
            "{class} missing"
        );
    }
    let pbf = r
        .events
        .iter()
        .find(|e| e["error"]["class"] == "PortBindingFailed")
        .unwrap();
    assert_eq!(pbf["error"]["module"], "nova.exception");
    assert_eq!(pbf["callee"]["service"], "nova-compute");
    assert!(r.metrics.contains("exception=\"PortBindingFailed\""));
    assert!(
        r.events
            .iter()
            .any(|e| e["kind"] == "notification" && e["priority"] == "ERROR")
    );
}

#[test]
fn dead_consumer() {
    let r = golden("dead_consumer");
    let timeouts: Vec<_> = r
        .events
        .iter()
        .filter(|e| e["outcome"] == "timeout")
        .collect();
    assert_eq!(timeouts.len(), 4);
    for t in &timeouts {
        assert_eq!(t["timeout_s"], 2.0);
        assert!(t["t_reply_deliver"].is_null());
    }
    // casts to a queue nobody consumes are reported as undelivered
    assert_eq!(
        r.events
            .iter()
            .filter(|e| e["type"] == "cast" && e["outcome"] == "undelivered")
            .count(),
        3
    );
    assert!(r.metrics.contains(
        "stacktap_rpc_timeouts_total{topic=\"compute\",method=\"get_console_output\"} 4"
    ));
}

#[test]
fn slow_server() {
    let r = golden("slow_server");
    assert!(count(&r, "outcome", "late_reply") >= 2);
    assert_eq!(count(&r, "outcome", "unroutable"), 1);
    assert!(
        r.events
            .iter()
            .any(|e| e["heartbeats"].as_u64().unwrap_or(0) >= 2),
        "call-monitor heartbeats"
    );
    assert!(
        r.metrics
            .contains("stacktap_amqp_returns_total{reply_code=\"312\"}")
    );
}

/// Every delivery of a cast or fanout to a server the servers handled, counted exactly
/// once (handled records all fall inside these captures: nothing is in flight at the end).
fn deliveries_match_handled_exactly(r: &Replayed, truth: &[serde_json::Value]) {
    for method in [
        "update_instance_info",
        "build_and_run_instance",
        "schedule_and_build_instances",
    ] {
        let handled = truth
            .iter()
            .filter(|t| t["kind"] == "handled" && t["method"] == method)
            .count() as u64;
        let delivered: u64 = r
            .events
            .iter()
            .filter(|e| e["kind"] == "rpc" && e["method"] == method)
            .map(|e| e["deliveries"].as_u64().unwrap())
            .sum();
        assert_eq!(delivered, handled, "{method}: deliveries vs handled");
    }
}

/// oslo.messaging's modern options all on: quorum topic queues, quorum reply queues named
/// by the queue manager (`reply_<host>:<process>:<n>`), one stream queue per fanout topic.
/// A scheduler attaches late to the stream and one re-reads it after a broker cancel; a
/// call is redelivered by the quorum queue to a second consumer after the first died
/// holding it; every notification is requeued once by its consumer.
#[test]
fn modern_oslo_options() {
    let r = golden("modern");
    let truth = read_truth(&repo().join("sampledata/modern.truth.jsonl"));
    deliveries_match_handled_exactly(&r, &truth);
    let redelivered: Vec<&serde_json::Value> = r
        .events
        .iter()
        .filter(|e| e["kind"] == "rpc" && e["redeliveries"].as_u64() > Some(0))
        .collect();
    let call = redelivered
        .iter()
        .find(|e| e["type"] == "call")
        .expect("the call the broker redelivered");
    // answered by the consumer it was redelivered to, as the processes recorded
    let served = truth
        .iter()
        .find(|t| t["kind"] == "handled" && t["request_id"] == call["request_id"])
        .unwrap();
    assert_eq!(call["callee"]["pid"], served["pid"]);
    assert_eq!(call["outcome"], "ok");
    assert!(
        r.metrics
            .contains("stacktap_rpc_redeliveries_total{topic=\"longtask\"")
    );
    assert!(
        r.events
            .iter()
            .any(|e| e["kind"] == "rpc" && e["reply_q"].as_str().is_some_and(|q| q.contains(':'))),
        "queue-manager reply queue names"
    );
    // each notification once, though its consumer took every one twice
    let notified = truth
        .iter()
        .filter(|t| t["kind"] == "notified" && t["requeued"] == false)
        .count();
    let notifications = r
        .events
        .iter()
        .filter(|e| e["kind"] == "notification" && e["event_type"] == "compute.instance.create.end")
        .count();
    assert_eq!(notifications, notified);
    assert!(
        r.metrics
            .contains("stacktap_amqp_consumer_cancels_total{queue_kind=\"rpc\"} 1"),
        "the broker's cancel of sched1's queue"
    );
}

/// enable_cancel_on_failover on classic queues: consumers carry x-cancel-on-ha-failover,
/// the broker cancels one when its queue goes, and the same story as above.
#[test]
fn cancel_on_failover() {
    let r = golden("failover");
    let truth = read_truth(&repo().join("sampledata/failover.truth.jsonl"));
    deliveries_match_handled_exactly(&r, &truth);
    assert!(
        r.metrics
            .contains("stacktap_amqp_consumer_cancels_total{queue_kind=\"rpc\"} 1")
    );
    assert!(r.events.iter().any(|e| e["kind"] == "rpc"
        && e["type"] == "call"
        && e["redeliveries"] == 1
        && e["outcome"] == "ok"));
}

#[test]
fn midstream() {
    let r = golden("midstream");
    // joined after the connections were up: their connection.start-ok went by before the
    // capture, so those processes are known by address only, never invented (named ones
    // are checked against the truth above)
    let unnamed = r
        .events
        .iter()
        .filter(|e| e["type"] == "call" && e["caller"]["service"].is_null());
    assert!(unnamed.clone().count() > 0);
    assert!(unnamed.clone().all(|e| e["caller"]["host"] == "127.0.0.1"));
}

#[test]
fn replay_is_deterministic() {
    let f = [repo().join("sampledata/remote_error.pcap")];
    let a = replay(&f);
    let b = replay(&f);
    assert_eq!(a.events_text, b.events_text);
    assert_eq!(a.metrics, b.metrics);
}

#[test]
fn several_files_merge_in_time_order() {
    let dir = repo().join("sampledata");
    let files = [dir.join("slow_server.pcap"), dir.join("healthy.pcap")];
    let r = replay(&files);
    let mut truth = read_truth(&dir.join("healthy.truth.jsonl"));
    truth.extend(read_truth(&dir.join("slow_server.truth.jsonl")));
    let bad = check_against_truth(&r, &truth);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The same capture as pcapng and as nanosecond pcap (converted by Wireshark's editcap)
/// gives the same events as the original microsecond pcap.
#[test]
fn pcapng_and_nanosecond_pcap_give_the_same_events() {
    let src = repo().join("sampledata/remote_error.pcap");
    let dir = tempfile::tempdir().unwrap();
    let original = replay(std::slice::from_ref(&src));
    for (format, name) in [("pcapng", "x.pcapng"), ("nsecpcap", "x.nsec.pcap")] {
        let out = dir.path().join(name);
        let ok = std::process::Command::new("editcap")
            .args(["-F", format])
            .arg(&src)
            .arg(&out)
            .status()
            .expect("editcap (from tshark/wireshark-common) must be installed: .ci/run installs it")
            .success();
        assert!(ok, "editcap -F {format} failed");
        let converted = replay(&[out]);
        assert_eq!(converted.events_text, original.events_text, "{format}");
    }
}

/// Tiny caps on a real capture: tables stay within them, every eviction is counted, and no
/// call or cast disappears from the events (evicted ones are still reported).
#[test]
fn caps_bound_memory_and_count_evictions() {
    let f = [repo().join("sampledata/dead_consumer.pcap")];
    let normal = replay(&f);
    let mut cfg = stacktap::config::Config::default();
    cfg.rpc.max_pending_calls = 1;
    cfg.rpc.max_pending_messages = 1;
    cfg.tcp.max_flows = 4;
    cfg.metrics.max_series_per_family = 2;
    let tight = replay_with(&f, cfg);
    let rpc = |r: &Replayed| r.events.iter().filter(|e| e["kind"] == "rpc").count();
    assert_eq!(
        rpc(&tight),
        rpc(&normal),
        "an evicted call or cast was lost"
    );
    for table in ["rpc_calls", "rpc_messages", "tcp_flows"] {
        assert!(
            tight.health.evictions.get(table).copied().unwrap_or(0) > 0,
            "{table} never evicted"
        );
        assert!(
            tight
                .metrics
                .contains(&format!("stacktap_evictions_total{{table=\"{table}\"}}")),
            "{table}"
        );
    }
    assert!(tight.metrics.contains("stacktap_series_folded_total"));
    assert!(
        tight.metrics.contains("method=\"other\""),
        "no series folded into other"
    );
}

#[test]
fn rest() {
    // the RPC half (nova-api's casts, the scheduler's calls) against the truth, as above
    let r = golden("rest");
    let dir = repo().join("sampledata");
    let truth = read_truth(&dir.join("rest.truth.jsonl"));
    let bad = check_rest_against_truth(&r, &truth);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // the faults the services injected show up with their messages
    let faults: Vec<&serde_json::Value> = r
        .events
        .iter()
        .filter(|e| e["kind"] == "http" && e["status"] == 500)
        .collect();
    assert!(faults.iter().any(|e| e["service"] == "neutron"
        && e["route"] == "/v2.0/ports/{id}"
        && e["error"]["type"] == "PortBindingFailed"));
    assert!(faults.iter().any(
        |e| e["service"] == "placement" && e["error"]["message"] == "Database connection lost"
    ));
    // nova-scheduler's keystoneauth User-Agent names it
    assert!(r.events.iter().any(|e| e["kind"] == "http"
        && e["client"]["service"] == "nova-scheduler"
        && e["service"] == "placement"));
    assert!(r.metrics.contains(
        "stacktap_http_requests_total{client=\"python-neutronclient\",service=\"neutron\",method=\"PUT\",route=\"/v2.0/ports/{id}\",code=\"500\"}"
    ));
    assert!(r.metrics.contains("stacktap_http_request_duration_seconds_count{service=\"nova\",method=\"POST\",route=\"/v2.1/servers\"}"));
    assert_eq!(r.summary.anomalies.len(), 0, "{:?}", r.summary.anomalies);
    // no token, password or keystone credential of the capture in any output
    let secrets = secrets_in_capture(&dir.join("rest.pcap"));
    assert!(
        secrets.len() > 10,
        "the capture should carry tokens: {secrets:?}"
    );
    assert!(secrets.iter().any(|s| s.starts_with(PASSWORD_PREFIX)));
    assert_no_secrets("rest", &r, &secrets);
}

#[test]
fn failures() {
    let r = golden("failures");
    let dir = repo().join("sampledata");
    let truth = read_truth(&dir.join("failures.truth.jsonl"));
    let mut bad = check_rest_against_truth(&r, &truth);
    bad.extend(check_chains_against_truth(&r, &truth));
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // the stories of the scenario, each as its root cause (a reschedule that ran out of
    // hosts counts under what failed on the host tried, not the scheduler's NoValidHost)
    let roots: Vec<(String, String)> = r
        .summary
        .rca
        .roots
        .iter()
        .map(|c| {
            (
                c.service.clone().unwrap_or_default(),
                c.error.clone().unwrap_or_default(),
            )
        })
        .collect();
    for want in [
        ("neutron-server", "PortBindingFailed"),
        ("placement-api", "Internal Server Error"),
        ("queue:compute.host3", "MessagingTimeout"),
    ] {
        assert!(
            roots.iter().any(|(s, e)| s == want.0 && e == want.1),
            "{want:?} not among {roots:?}"
        );
    }
    assert!(r.summary.rca.masked_failures > 0);
    assert!(
        !roots.iter().any(|(_, e)| e == "NoValidHost"),
        "an exhausted reschedule blamed on the scheduler: {roots:?}"
    );
    let chains: Vec<&serde_json::Value> =
        r.events.iter().filter(|e| e["kind"] == "chain").collect();
    let exhausted: Vec<&&serde_json::Value> = chains
        .iter()
        .filter(|c| c["attempts"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    assert!(!exhausted.is_empty(), "no chain of an exhausted reschedule");
    for c in exhausted {
        let hops = c["hops"].as_array().unwrap();
        let ran_out = &hops[hops.len() - 2];
        assert_eq!(ran_out["error"], "NoValidHost", "{c}");
        assert_eq!(hops[hops.len() - 1], c["root"]);
        assert_eq!(c["root"]["service"], "neutron-server");
    }
    // the root hop names what to grep the service's log for
    for c in &chains {
        let root = &c["root"];
        assert!(
            root["request_id"].is_string() || root["msg_id"].is_string(),
            "root without an id: {c}"
        );
    }
    assert!(
        r.metrics
            .contains("stacktap_error_chains_total{origin_service=\"nova-api\"")
    );
    let secrets = secrets_in_capture(&dir.join("failures.pcap"));
    assert_no_secrets("failures", &r, &secrets);
}

#[test]
fn healthy_captures_have_no_chain() {
    for scenario in ["healthy", "rest"] {
        let r = replay(&[repo().join(format!("sampledata/{scenario}.pcap"))]);
        let chains = r.events.iter().filter(|e| e["kind"] == "chain").count();
        // the rest sample injects faults; the healthy one must have none at all
        if scenario == "healthy" {
            assert_eq!(chains, 0);
        } else {
            assert!(chains > 0);
        }
    }
}

/// The demo's loop: the same capture replayed again in one run (shifted in time, on a
/// restarted pipeline) counts every call, REST exchange and failing request once more:
/// its repeated ids are not mistaken for duplicates of the first pass.
#[test]
fn a_capture_replayed_again_counts_twice() {
    use stacktap::config::Config;
    use stacktap::run::{self, Outputs, Run};
    use stacktap::source::file::MergedFiles;
    use std::collections::BTreeMap;

    let files = [repo().join("sampledata/failures.pcap")];
    let mut run = Run::new(Config::default(), &Outputs::default()).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let snapshot = |run: &Run| {
        let graph = run.sinks().graph.lock().unwrap().report(None);
        let edges: BTreeMap<String, (u64, u64, u64)> = graph
            .edges
            .iter()
            .map(|e| {
                let key = format!("{} {} {} {}", e.source, e.target, e.kind, e.operation);
                (key, (e.requests, e.errors, e.timeouts))
            })
            .collect();
        let rca = run.sinks().requests.lock().unwrap().rca(f64::MIN);
        (edges, rca.failed_requests, rca.masked_failures)
    };
    let mut first = MergedFiles::open(&files).unwrap();
    run::replay(&mut first, &mut run, None, &Outputs::default(), &stop).unwrap();
    run.end_pass();
    let once = snapshot(&run);
    assert_eq!(once.1, 8, "failing requests in one pass");
    run::replay_again(
        &mut MergedFiles::open(&files).unwrap(),
        &mut run,
        None,
        &stop,
    )
    .unwrap();
    let twice = snapshot(&run);
    let doubled: BTreeMap<String, (u64, u64, u64)> = once
        .0
        .iter()
        .map(|(k, (r, e, t))| (k.clone(), (2 * r, 2 * e, 2 * t)))
        .collect();
    assert_eq!(twice.0, doubled, "graph edges after two passes");
    assert_eq!((twice.1, twice.2), (2 * once.1, 2 * once.2));
}

/// The cluster scenario's captures: one per RabbitMQ node (a, b, c) and one of the API
/// ports, as four sidecars see a region whose processes each list all three nodes.
fn cluster_capture(node: &str) -> std::path::PathBuf {
    repo().join(format!("sampledata/cluster/cluster-{node}.pcap"))
}

/// stacktap's config for the cluster's nodes (their AMQP ports).
pub fn cluster_config() -> stacktap::config::Config {
    stacktap::config::Config::from_toml("[amqp]\nports = [5672, 5682, 5683, 5684]\n").unwrap()
}

/// Each node alone sees part of every call: it must say so, and judge nothing its
/// evidence cannot support (no timeout, no undelivered cast, no orphan-reply anomaly,
/// no chain).
#[test]
fn a_cluster_node_alone_reports_its_partial_view_and_no_false_failure() {
    for node in ["a", "b", "c"] {
        let r = replay_with(&[cluster_capture(node)], cluster_config());
        assert!(r.summary.partial_view, "{node}: partial view not reported");
        assert!(r.metrics.contains("stacktap_partial_view"), "{node}");
        for e in &r.events {
            assert!(
                !matches!(
                    e["outcome"].as_str(),
                    Some("timeout" | "undelivered" | "late_reply")
                ),
                "{node}: false failure {e}"
            );
            assert_ne!(e["kind"], "chain", "{node}: false chain {e}");
        }
        assert!(
            !r.summary.anomalies.contains_key("oslo/reply_without_call"),
            "{node}: {:?}",
            r.summary.anomalies
        );
    }
}

/// The four captures merged in one replay (one vantage point that sees everything)
/// agree with the processes' truth: calls, casts, fanouts, REST, failures and chains.
#[test]
fn a_cluster_seen_whole_matches_the_truth() {
    let files: Vec<_> = ["a", "b", "c", "api"].map(cluster_capture).into();
    let r = replay_with(&files, cluster_config());
    let truth = read_truth(&repo().join("sampledata/cluster/cluster.truth.jsonl"));
    let bad = check_all_against_truth(&r, &truth, 0.0);
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(!r.summary.partial_view);
}
