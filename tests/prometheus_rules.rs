//! The Prometheus rules in rules/: promtool accepts them, every alert's unit test passes
//! (firing and not firing), and every metric they name is one stacktap really exports.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::process::Command;

fn promtool(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool must be installed (Debian package prometheus; .ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The metric names a sample replay exports (series names, suffixes included).
pub fn exported_names() -> BTreeSet<String> {
    let dir = repo().join("sampledata");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
        .collect();
    files.sort();
    let r = replay(&files);
    let mut names: BTreeSet<String> = r
        .metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect();
    // every family is declared even where it has no series (the fleet's exist at a
    // collector): its sample names, as OpenMetrics spells them
    for line in r.metrics.lines() {
        let mut w = line.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// `stacktap_*` and `traces_service_graph_*` names in a text (rule or dashboard).
pub fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for prefix in ["stacktap_", "traces_service_graph_"] {
        let mut at = 0;
        while let Some(i) = text[at..].find(prefix) {
            let start = at + i;
            let before = text[..start].chars().last();
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |e| start + e);
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                out.insert(text[start..end].to_string());
            }
            at = end;
        }
    }
    out
}

#[test]
fn rules_check_and_every_alert_has_a_passing_unit_test() {
    let rules = repo().join("rules");
    let out = promtool(&["check", "rules", "stacktap.rules.yml"], &rules);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "tests/stacktap.test.yml"], &rules);
    assert!(out.contains("SUCCESS"), "{out}");
    // every alert appears in the tests, both firing and not firing
    let text = std::fs::read_to_string(rules.join("stacktap.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(rules.join("tests/stacktap.test.yml")).unwrap();
    let alerts: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for a in alerts {
        let blocks: Vec<&str> = tests
            .split("- eval_time:")
            .filter(|b| b.contains(&format!("alertname: {a}\n")))
            .collect();
        assert!(
            blocks.iter().any(|b| b.contains("exp_alerts: []")),
            "{a}: no not-firing test"
        );
        assert!(
            blocks.iter().any(|b| b.contains("exp_labels:")),
            "{a}: no firing test"
        );
    }
}

#[test]
fn rules_name_only_metrics_stacktap_exports() {
    let text = std::fs::read_to_string(repo().join("rules/stacktap.rules.yml")).unwrap();
    let exported = exported_names();
    let named = named_metrics(&text);
    assert!(named.len() > 8, "{named:?}");
    for m in named {
        // a family named by its base name (in prose) counts when its series exist
        let known = ["", "_bucket", "_total"]
            .iter()
            .any(|suffix| exported.contains(&format!("{m}{suffix}")));
        assert!(known, "the rules use {m}, which stacktap does not export");
    }
}

/// Grafana's variables replaced by values Prometheus accepts.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$topic", ".*")
        .replace("$queue", ".*")
        .replace("$service", ".*")
}

#[test]
fn dashboards_are_current_parse_and_name_only_exported_metrics() {
    let dir = repo().join("dashboards");
    let status = Command::new("python3")
        .arg(dir.join("build.py"))
        .arg("--check")
        .status()
        .expect("python3");
    assert!(
        status.success(),
        "dashboards/*.json differ from dashboards/build.py"
    );
    let exported = exported_names();
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    let mut n = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 6, "{files:?}");
    for f in files {
        let board: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let vars = board["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "{name}: no ${{datasource}} variable"
        );
        for p in board["panels"].as_array().unwrap() {
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{name}: {}",
                p["title"]
            );
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                for m in named_metrics(expr) {
                    assert!(exported.contains(&m), "{name}: {m} is not exported");
                }
                // promtool parses each query as a recording rule's expression
                rules.push_str(&format!(
                    "      - record: dashboard:q{n}\n        expr: {}\n",
                    serde_json::to_string(&concrete(expr)).unwrap()
                ));
                n += 1;
            }
        }
    }
    assert!(n > 25, "only {n} queries");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("queries.yml"), rules).unwrap();
    let out = promtool(&["check", "rules", "queries.yml"], tmp.path());
    assert!(out.contains(&format!("SUCCESS: {n} rules found")), "{out}");
}

/// Grafana's own dashboard schema (@grafana/schema's `Dashboard`, type-checked by tsc from
/// ui/node_modules): no missing required field, no wrong type, no unknown key.
#[test]
fn dashboards_match_grafanas_schema() {
    let ui = repo().join("ui");
    assert!(
        ui.join("node_modules/@grafana/schema").is_dir()
            && ui.join("node_modules/typescript").is_dir(),
        "ui/node_modules lacks @grafana/schema or typescript: run scripts/setup-deps (npm ci in ui/)"
    );
    let out = Command::new("node")
        .arg(ui.join("test/grafana-schema.test.mjs"))
        .arg(repo().join("dashboards"))
        .output()
        .expect("node is needed for the dashboard schema check (Node.js 20)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("6 dashboards match Grafana's schema"),
        "{text}"
    );
}
