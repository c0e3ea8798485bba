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
    r.metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
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
